"""Distributed SAE training behind one interface: ``train_distributed(source, params, backend=...)``.

Backends
--------
``"local"``   one process, no process group (the reference).
``"torch"``   PyTorch DDP launched by ``pyspark.ml.torch.distributor.TorchDistributor`` (gloo on CPU, nccl
              on GPU). ``local_mode=True`` runs the ranks as processes on the driver (tests, one machine);
              ``local_mode=False`` runs them as a barrier Spark job on the executors.
``"horovod"`` ``horovod.spark.run`` (one Spark task per rank, Gloo rendezvous through the driver) +
              ``horovod.torch`` (allreduce, ``DistributedOptimizer``) when Horovod is installed
              (``t2p setup --horovod``); otherwise :class:`BackendUnavailableError` with a one-line explanation.

Data never passes through the driver: the driver only *lists* the parquet files of the Delta snapshot
(:func:`delta_source`, via ``DataFrame.inputFiles()``), and each rank reads its own contiguous slice of
rows with pyarrow (:meth:`ParquetShards.read_shard`). Shards differ in size by at most one row.

All backends run the same :func:`tokens2policy.represent.sae.train_loop`; they only differ in the
``comm`` object that sums statistics and averages gradients. Every rank draws the same global shuffle,
so global batch t holds the same rows for any number of ranks; each rank processes the rows of it that it
holds, and losses are scaled so the averaged gradient equals the single-process gradient of that batch.
Hence W-process training follows the single-process trajectory (up to floating-point summation order),
which the tests check.
"""
from __future__ import annotations

import os
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .sae import LocalComm, SAEParams, SparseAutoencoder, train_loop

__all__ = [
    "BackendUnavailableError",
    "ParquetShards",
    "ArraySource",
    "delta_source",
    "train_distributed",
    "horovod_available",
    "BACKENDS",
]

BACKENDS = ("local", "torch", "horovod")


class BackendUnavailableError(RuntimeError):
    """A requested training backend cannot run here; ``str(err)`` is a one-line explanation."""


# ----------------------------------------------------------------------------------------------
# data sources
# ----------------------------------------------------------------------------------------------

def _local_path(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for a file URI as Spark lists it (``file:/...``, ``s3a://...``)."""
    import pyarrow.fs as pafs

    if uri.startswith("file:"):
        return pafs.LocalFileSystem(), urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    fs, path = pafs.FileSystem.from_uri(uri.replace("s3a://", "s3://"))
    return fs, path


def _partition_values(uri: str) -> dict[str, str]:
    """Hive-style partition values encoded in a file path (``.../experiment_id=e1/part-...``)."""
    out = {}
    for part in urllib.parse.unquote(uri).split("/")[:-1]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def _list_to_matrix(col, what: str) -> np.ndarray:
    """Fixed-length list<float> pyarrow column -> (rows x dim) float32 matrix."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if col.null_count:
        raise ValueError(f"{what}: column has {col.null_count} null vectors")
    offsets = np.asarray(col.offsets)
    lens = np.diff(offsets)
    if not (lens == lens[0]).all():
        raise ValueError(f"{what}: vectors have different lengths ({lens.min()}..{lens.max()})")
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(n, int(lens[0]))


@dataclass
class ParquetShards:
    """Parquet files (e.g. one Delta snapshot) holding a ``vector`` array column; each rank reads
    its own slice. ``partition_filter`` keeps only files whose Hive partition values match
    (e.g. ``{"experiment_id": "e1"}``)."""

    files: Sequence[str]
    column: str = "vector"
    partition_filter: dict = field(default_factory=dict)

    def __post_init__(self):
        self.files = sorted(str(f) for f in self.files)
        if self.partition_filter:
            want = {k: str(v) for k, v in self.partition_filter.items()}
            self.files = [f for f in self.files
                          if all(_partition_values(f).get(k) == v for k, v in want.items())]

    def _row_counts(self) -> list[int]:
        import pyarrow.parquet as pq

        counts = []
        for f in self.files:
            fs, path = _local_path(f)
            with fs.open_input_file(path) as fh:
                counts.append(pq.ParquetFile(fh).metadata.num_rows)
        return counts

    def num_rows(self) -> int:
        return int(sum(self._row_counts()))

    def read_shard(self, rank: int, world: int) -> np.ndarray:
        """Rows ``[rank*N/world, (rank+1)*N/world)`` of the concatenated files; reads only the files
        that overlap that range (footers of all files are read to count rows)."""
        import pyarrow.parquet as pq

        if not self.files:
            raise ValueError("the training table has no data files (empty table or filter matched nothing)")
        counts = self._row_counts()
        total = int(sum(counts))
        lo, hi = (rank * total) // world, ((rank + 1) * total) // world
        parts, start = [], 0
        for f, c in zip(self.files, counts):
            a, b = max(lo, start), min(hi, start + c)
            if a < b:
                fs, path = _local_path(f)
                with fs.open_input_file(path) as fh:
                    tab = pq.read_table(fh, columns=[self.column])
                parts.append(_list_to_matrix(tab.column(self.column).slice(a - start, b - a), f))
            start += c
        parts = [p for p in parts if p.size]
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts, axis=0)

    def read_all(self) -> np.ndarray:
        return self.read_shard(0, 1)


@dataclass
class ArraySource:
    """An in-memory matrix (small data, tests); ranks slice it like :class:`ParquetShards`."""

    x: np.ndarray

    def read_shard(self, rank: int, world: int) -> np.ndarray:
        x = np.asarray(self.x, dtype=np.float32)
        n = x.shape[0]
        return x[(rank * n) // world:((rank + 1) * n) // world]

    def read_all(self) -> np.ndarray:
        return np.asarray(self.x, dtype=np.float32)


def delta_source(spark, path_or_df, column: str = "vector", partition_filter: dict | None = None) -> ParquetShards:
    """List the parquet files of a Delta table's current snapshot (or of any file-based DataFrame).

    Only file names reach the driver. Caveat: direct parquet reads ignore Delta deletion vectors and
    column mapping; the stage tables are written by overwrite/append, which create neither.
    """
    df = path_or_df if hasattr(path_or_df, "inputFiles") else spark.read.format("delta").load(str(path_or_df))
    return ParquetShards(df.inputFiles(), column=column, partition_filter=partition_filter or {})


# ----------------------------------------------------------------------------------------------
# communicators
# ----------------------------------------------------------------------------------------------

class TorchDDPComm:
    """torch.distributed process group (gloo / nccl) + DistributedDataParallel."""

    def __init__(self, device):
        import torch.distributed as dist

        self.dist = dist
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def allreduce_sum(self, t):
        out = t.detach().clone().to(self.device)
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM)
        return out.to(t.device)

    def wrap(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [self.device.index] if self.device.type == "cuda" else None
        # since_fired is updated identically on every rank, so no per-forward buffer sync is needed
        key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else "broadcast_buffers")
        return DDP(model, device_ids=ids, **{key: False}), optimizer

    def after_backward(self, model):
        """DDP already averaged the gradients during backward."""


class _HorovodOptimizer:
    """Run ``step`` without a second gradient synchronisation (done in ``after_backward``)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad()  # Horovod's override takes no arguments; torch >= 2 sets the gradients to None

    def step(self):
        with self.opt.skip_synchronize():
            self.opt.step()


class HorovodComm:
    """horovod.torch: allreduce for statistics, DistributedOptimizer for gradients."""

    def __init__(self, hvd, device):
        self.hvd = hvd
        self.device = device
        self.rank = hvd.rank()
        self.world = hvd.size()
        self._opt = None

    def allreduce_sum(self, t):
        return self.hvd.allreduce(t.detach().clone(), op=self.hvd.Sum)

    def wrap(self, model, optimizer):
        hvd = self.hvd
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average)
        # No hvd.broadcast_optimizer_state: the Adam state is still empty (identical on every rank), and Horovod
        # would initialise it with a zero-gradient step, which advances Adam's step count and so changes the bias
        # correction of every later step -- the run would no longer follow the single-process trajectory.
        self._opt = opt
        return model, _HorovodOptimizer(opt)

    def after_backward(self, model):
        self._opt.synchronize()


# ----------------------------------------------------------------------------------------------
# worker entry points (module-level so they pickle by reference)
# ----------------------------------------------------------------------------------------------

def _set_threads(world: int, use_gpu: bool):
    import torch

    if not use_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))


def _ddp_worker(source, params: SAEParams, use_gpu: bool):
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl" if use_gpu else "gloo")
    try:
        if use_gpu:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        comm = TorchDDPComm(device)
        _set_threads(comm.world, use_gpu)
        x = source.read_shard(comm.rank, comm.world)
        result = train_loop(x, replace(params, device=str(device)), comm)
        result["world"] = comm.world
        # Every rank returns the (identical, synchronously trained) result: in local mode all ranks
        # write TorchDistributor's one output file, so they must write the same bytes.
        return result
    finally:
        dist.destroy_process_group()


def _horovod_worker(source, params: SAEParams, use_gpu: bool):
    import horovod.torch as hvd
    import torch

    hvd.init()
    if use_gpu:
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
    comm = HorovodComm(hvd, device)
    _set_threads(comm.world, use_gpu)
    x = source.read_shard(comm.rank, comm.world)
    result = train_loop(x, replace(params, device=str(device)), comm)
    result["world"] = comm.world
    return result


def horovod_available() -> tuple[bool, str]:
    """(True, "") when horovod.torch and horovod.spark import; else (False, one-line reason)."""
    try:
        import horovod.spark  # noqa: F401
        import horovod.torch  # noqa: F401
    except Exception as e:  # ImportError, or a horovod build without torch/spark support
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, (f"backend='horovod' needs the optional 'horovod' extra compiled for this torch: run "
                       f"`t2p setup --horovod` (or `make setup-horovod`); import failed: {msg}")
    return True, ""


@contextmanager
def _package_on_pythonpath():
    """Worker processes started by torchrun must import this package even without an installed copy."""
    import tokens2policy

    root = os.path.dirname(os.path.dirname(os.path.abspath(tokens2policy.__file__)))
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + parts)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _as_params(params) -> SAEParams:
    if isinstance(params, SAEParams):
        return params.validate()
    if isinstance(params, dict):
        unknown = set(params) - set(SAEParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SAE parameter(s): {sorted(unknown)}")
        return SAEParams(**params).validate()
    raise ValueError(f"params must be an SAEParams or a dict, got {type(params).__name__}")


def train_distributed(data_source, params, backend: str = "torch", num_processes: int = 2,
                      use_gpu: bool = False, spark=None, local_mode: bool | None = None,
                      on_epoch=None) -> SparseAutoencoder:
    """Train a TopK SAE with the chosen backend and return a fitted :class:`SparseAutoencoder`.

    data_source: :class:`ParquetShards` (see :func:`delta_source`), :class:`ArraySource`, or a numpy array.
    params: :class:`SAEParams` or a dict of its fields (``batch_size`` is the global batch).
    backend: "local" (one process), "torch" (TorchDistributor / DDP), "horovod" (horovod.spark).
    local_mode: TorchDistributor's local mode; None -> True when the Spark master is ``local[...]``.
    on_epoch: ``(epoch, history_entry)`` after each epoch, with the local backend (the distributed ones train in
    Spark tasks, whose progress the driver follows as tasks).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if int(num_processes) < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes!r}")
    p = _as_params(params)
    if isinstance(data_source, np.ndarray):
        data_source = ArraySource(data_source)
    if not hasattr(data_source, "read_shard"):
        raise ValueError("data_source must be a ParquetShards, an ArraySource or a numpy array")

    if backend == "local":
        result = train_loop(data_source.read_all(), p, LocalComm(), on_epoch=on_epoch)
        result["world"] = 1
    elif backend == "horovod":
        ok, why = horovod_available()
        if not ok:
            raise BackendUnavailableError(why)
        import horovod.spark
        from pyspark.sql import SparkSession

        if (spark or SparkSession.getActiveSession()) is None:
            raise ValueError("backend='horovod' needs an active SparkSession (horovod.spark.run starts the ranks in "
                             "Spark tasks)")
        with _package_on_pythonpath():
            # one Spark task per rank (each needs a free task slot); rank 0's result, identical on every rank
            results = horovod.spark.run(_horovod_worker, args=(data_source, p, use_gpu), num_proc=int(num_processes),
                                        verbose=0)
        result = results[0]
    else:
        from pyspark.sql import SparkSession
        from pyspark.ml.torch.distributor import TorchDistributor

        spark = spark or SparkSession.getActiveSession()
        if spark is None:
            raise ValueError("backend='torch' needs an active SparkSession (TorchDistributor runs through Spark)")
        if local_mode is None:
            local_mode = str(spark.sparkContext.master).startswith("local")
        with _package_on_pythonpath():
            dist = TorchDistributor(num_processes=int(num_processes), local_mode=bool(local_mode), use_gpu=bool(use_gpu))
            result = dist.run(_ddp_worker, data_source, p, bool(use_gpu))
        if result is None:
            raise RuntimeError("TorchDistributor returned no result")
    sae = SparseAutoencoder.from_result(result, replace(p, device="cpu"))
    sae.training_info_ = {"backend": backend, "world": int(result.get("world", 1)),
                          "use_gpu": bool(use_gpu)}
    return sae
