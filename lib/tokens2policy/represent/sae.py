"""TopK sparse autoencoder (SAE) over frozen text-model states.

Why a TopK SAE: the downstream search (NEXIS) needs coordinates that are individually interpretable
and sparse, so that "does neuron j modify the treatment effect" is a question about one human-readable
feature. A TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") learns an
overcomplete dictionary ``D`` (``n_latents`` unit-norm atoms, typically 8x the model dimension) and
codes each input by keeping only its ``k`` largest encoder activations::

    x_n   = (x - mean) / scale                       # normalization statistics stored with the model
    z     = ReLU(TopK_k(W_enc (x_n - b_pre) + b_enc)) # exactly <= k non-zeros per row
    x_hat = (z D + b_pre) * scale + mean

TopK fixes the L0 directly (no L1 shrinkage bias, no sparsity-penalty tuning). Decoder atoms are kept
at unit norm (renormalized after every optimizer step, with the gradient component parallel to each
atom removed first), so code magnitudes are comparable across neurons. Dead latents (never selected
for ``dead_after`` consecutive training samples) get an auxiliary loss: the top ``aux_k`` dead latents
are asked to reconstruct the main model's residual (Gao et al. 2024, sec. A.2), which revives them.

Initialisation follows Gao et al.: random unit-norm decoder atoms and ``W_enc = D^T`` (the
encoder starts as the decoder's transpose), ``b_pre = 0`` after centring by the data mean.

The training loop (:func:`train_loop`) is one function for every backend: it is given a ``comm``
object (local, torch DDP, Horovod: see :mod:`tokens2policy.represent.distributed`) that reduces
statistics and gradients across workers, so single-process and distributed training share all code.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "SAEParams",
    "TopKSAE",
    "SparseAutoencoder",
    "LocalComm",
    "train_loop",
    "reconstruction_metrics",
    "latents_for_corpus",
    "csr_to_rows",
    "rows_to_csr",
]


@dataclass
class SAEParams:
    """Hyper-parameters of a TopK SAE (plain data: travels to distributed workers by pickling).

    n_latents: dictionary size; None -> ``expansion * d``.
    k: active latents per input (the exact L0 bound).
    aux_k: dead latents used in the auxiliary loss (0 disables it); aux_coef its weight.
    dead_after: a latent not selected for this many consecutive training samples counts as dead
        during training; None -> one epoch's worth of samples.
    batch_size: the GLOBAL batch size (distributed workers each take ``batch_size // world``).
    lr_schedule: "cosine" (decay to 0.1*lr over training: ends near a minimum, so runs that differ
        only in batch order end at the same quality) or "constant".
    num_threads: torch CPU threads while training. None: one thread when a step's encoder product is small
        (batch_size x d x n_latents <= SMALL_STEP, e.g. the demo's 512 x 384 x 128), else torch's setting —
        on such products thread synchronisation costs more than it gains (the demo's 20-epoch training on a
        loaded 2-core machine: 65 s on one thread, 555 s on two; docs/benchmarks.md).
    matryoshka: nested dictionary prefixes (latent counts, increasing, each < n_latents); () = a plain TopK SAE.
        With prefixes m_1 < ... < m_L the loss is the mean over the levels m_1, ..., m_L, n_latents of the
        reconstruction error using only the active latents with index < m_l (Bussmann, Nabeshima, Karvonen &
        Nanda 2025, "Learning multi-level features with Matryoshka sparse autoencoders"): the first m_1 latents
        must reconstruct on their own, so they learn coarse, frequent features, and later latents add detail
        without absorbing them.
    """

    n_latents: int | None = None
    expansion: int = 8
    k: int = 32
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    aux_k: int = 64
    aux_coef: float = 1.0 / 32.0
    dead_after: int | None = None
    grad_clip: float = 1.0
    device: str = "cpu"
    num_threads: int | None = None
    lr_schedule: str = "cosine"
    matryoshka: tuple = ()

    def validate(self) -> "SAEParams":
        if self.n_latents is not None and int(self.n_latents) < 1:
            raise ValueError(f"n_latents must be a positive integer or None, got {self.n_latents!r}")
        if int(self.expansion) < 1:
            raise ValueError(f"expansion must be >= 1, got {self.expansion!r}")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if int(self.aux_k) < 0:
            raise ValueError(f"aux_k must be >= 0, got {self.aux_k!r}")
        self.matryoshka = tuple(int(m) for m in (self.matryoshka or ()))
        if any(m < 1 for m in self.matryoshka) or list(self.matryoshka) != sorted(set(self.matryoshka)):
            raise ValueError(f"matryoshka prefixes must be increasing positive latent counts, got {self.matryoshka!r}")
        return self

    def resolve_latents(self, d: int) -> int:
        m = int(self.n_latents) if self.n_latents is not None else int(self.expansion) * int(d)
        if self.k > m:
            raise ValueError(f"k={self.k} exceeds the dictionary size n_latents={m}")
        if self.matryoshka and max(self.matryoshka) >= m:
            raise ValueError(f"matryoshka prefixes {list(self.matryoshka)} must be smaller than n_latents={m}")
        return m


# ----------------------------------------------------------------------------------------------
# torch module (imported lazily so that importing the package does not require torch)
# ----------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def _module_class():
    torch = _torch()
    nn = torch.nn

    class _TopKSAE(nn.Module):
        """The network. ``W_dec`` rows are the dictionary atoms (the decoder's unit-norm columns in the
        ``x = D^T z`` convention)."""

        def __init__(self, d_in: int, n_latents: int, k: int, aux_k: int = 0, seed: int = 0,
                     aux_coef: float = 1.0 / 32.0, prefixes=()):
            super().__init__()
            self.d_in, self.n_latents, self.k, self.aux_k = int(d_in), int(n_latents), int(k), int(aux_k)
            self.prefixes = tuple(int(p) for p in prefixes or ())
            self.aux_coef = float(aux_coef)
            g = torch.Generator().manual_seed(int(seed))
            dec = torch.randn(n_latents, d_in, generator=g)
            dec /= dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec = nn.Parameter(dec)
            # encoder = decoder^T at init (contiguous: Horovod broadcasts and allreduces only contiguous tensors)
            self.W_enc = nn.Parameter(dec.t().clone(memory_format=torch.contiguous_format))
            self.b_enc = nn.Parameter(torch.zeros(n_latents))
            self.b_pre = nn.Parameter(torch.zeros(d_in))
            # normalization statistics (buffers: saved with the state dict, not trained)
            self.register_buffer("mean", torch.zeros(d_in))
            self.register_buffer("scale", torch.ones(()))
            # dead-latent tracking: samples since each latent was last selected
            self.register_buffer("since_fired", torch.zeros(n_latents, dtype=torch.long))

        # -- pieces ------------------------------------------------------------------------
        def normalize(self, x):
            return (x - self.mean) / self.scale

        def pre_activations(self, xn):
            return (xn - self.b_pre) @ self.W_enc + self.b_enc

        def topk(self, pre, k=None):
            vals, idx = pre.topk(int(k or self.k), dim=-1, sorted=False)
            return torch.relu(vals), idx

        def decode_topk(self, vals, idx):
            # sum_j vals_j * D[idx_j]  (gather is cheaper than a dense n x m product for small k)
            return torch.einsum("bk,bkd->bd", vals, self.W_dec[idx]) + self.b_pre

        # -- forward used for training -----------------------------------------------------
        def forward(self, xn, dead_mask=None):
            """Per-batch SUMS over rows: (loss, squared error, aux squared error, topk idx, topk values).

            Sums (not means) so that workers holding different numbers of a global batch's rows can be
            combined exactly: the trainer divides by the global batch size.
            """
            pre = self.pre_activations(xn)
            vals, idx = self.topk(pre)
            recon = self.decode_topk(vals, idx)
            err = xn - recon
            sse = err.pow(2).sum()
            main = sse
            if self.prefixes:  # Matryoshka: every nested prefix must reconstruct with its own active latents
                for m in self.prefixes:
                    part = self.decode_topk(vals * (idx < m).to(vals.dtype), idx)
                    main = main + (xn - part).pow(2).sum()
                main = main / (len(self.prefixes) + 1)
            aux = torch.zeros((), device=xn.device)
            if dead_mask is not None and self.aux_k > 0:
                n_dead = int(dead_mask.sum())
                if n_dead > 0:
                    kk = min(self.aux_k, n_dead)
                    masked = pre.masked_fill(~dead_mask, float("-inf"))
                    a_vals, a_idx = masked.topk(kk, dim=-1, sorted=False)
                    a_rec = torch.einsum("bk,bkd->bd", torch.relu(a_vals), self.W_dec[a_idx])
                    # the target is the detached residual: dead latents learn what the live ones miss
                    aux = (err.detach() - a_rec).pow(2).sum()
            loss = main + self.aux_coef * aux
            return loss, sse.detach(), aux.detach(), idx.detach(), vals.detach()

        @torch.no_grad()
        def renorm_decoder_(self):
            self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)

        @torch.no_grad()
        def project_decoder_grad_(self):
            """Remove the gradient component parallel to each (unit-norm) atom: it would only change
            the atom's norm, which the renormalization undoes anyway (Gao et al. 2024)."""
            g = self.W_dec.grad
            if g is None:
                return
            w = self.W_dec.data
            g -= (g * w).sum(dim=1, keepdim=True) * w

    return _TopKSAE


_MODULE_CLS = None


def TopKSAE(d_in: int, n_latents: int, k: int, aux_k: int = 0, seed: int = 0, aux_coef: float = 1.0 / 32.0,
            prefixes=()):
    """Build the torch module (see module docstring)."""
    global _MODULE_CLS
    if _MODULE_CLS is None:
        _MODULE_CLS = _module_class()
    return _MODULE_CLS(d_in, n_latents, k, aux_k=aux_k, seed=seed, aux_coef=aux_coef, prefixes=prefixes)


# ----------------------------------------------------------------------------------------------
# communication: the single-process version; distributed ones live in distributed.py
# ----------------------------------------------------------------------------------------------

class LocalComm:
    """Single-process 'communicator': every reduction is the identity."""

    rank = 0
    world = 1

    def allreduce_sum(self, t):
        return t

    def wrap(self, model, optimizer):
        return model, optimizer

    def after_backward(self, model):
        """Hook after ``loss.backward()`` (Horovod synchronizes gradients here)."""


def _moments(x, comm):
    """Global mean and RMS norm scale of the data across workers (one all-reduce).

    scale = sqrt(E ||x - mean||^2 / d): after normalization each coordinate has unit average variance,
    so the learning rate means the same thing for every embedding model.
    """
    torch = _torch()
    x64 = x.double()
    n = torch.tensor([float(x.shape[0])], dtype=torch.float64)
    s = x64.sum(0)
    ss = (x64 * x64).sum()
    packed = comm.allreduce_sum(torch.cat([n, s, ss.reshape(1)]))
    n_tot = packed[0]
    if n_tot <= 1:
        raise ValueError("need at least 2 training rows across all workers")
    mean = packed[1:-1] / n_tot
    var_total = packed[-1] / n_tot - (mean * mean).sum()
    d = x.shape[1]
    scale = torch.sqrt(torch.clamp(var_total / d, min=1e-12))
    return mean.float(), scale.float()


SMALL_STEP = 1 << 27  # batch x d x n_latents at or below which training runs on one thread (num_threads=None)


def train_loop(x_local: np.ndarray, params: SAEParams, comm=None, log_every: int = 0, on_epoch=None) -> dict:
    """Train a TopK SAE on this worker's rows; gradients and statistics are reduced through ``comm``.

    Every worker must call this with the same ``params`` (same seed -> identical initialisation).
    ``on_epoch(epoch, history_entry)`` is called on rank 0 after each epoch (progress display).
    Returns ``{"state": state_dict as numpy arrays, "config": {...}, "history": [...]}``.
    """
    torch = _torch()
    comm = comm or LocalComm()
    params = params.validate()
    if params.num_threads is None and np.ndim(x_local) == 2 and \
            int(params.batch_size) * np.shape(x_local)[1] * params.resolve_latents(np.shape(x_local)[1]) <= SMALL_STEP:
        params = replace(params, num_threads=1)
    if params.num_threads:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(params.num_threads))
        try:
            return train_loop(x_local, replace(params, num_threads=0), comm, log_every, on_epoch)  # 0: as set now
        finally:
            torch.set_num_threads(old_threads)
    x_local = np.ascontiguousarray(np.asarray(x_local, dtype=np.float32))
    if x_local.ndim != 2:
        raise ValueError(f"training data must be 2-D (rows x dim), got shape {x_local.shape}")
    if not np.isfinite(x_local).all():
        raise ValueError("training data contains NaN or infinite values")
    if x_local.shape[0] == 0:
        raise ValueError(f"worker {comm.rank} received no rows: use fewer processes or more data")
    d = x_local.shape[1]
    m = params.resolve_latents(d)
    torch.manual_seed(params.seed)
    device = torch.device(params.device)
    model = TopKSAE(d, m, params.k, aux_k=params.aux_k, seed=params.seed, aux_coef=params.aux_coef,
                    prefixes=params.matryoshka)
    x = torch.from_numpy(x_local)
    mean, scale = _moments(x, comm)
    model.mean.copy_(mean)
    model.scale.copy_(scale)
    model.to(device)
    xn = ((x - mean) / scale).to(device)

    # global row numbering: this worker holds rows [offset, offset + n_local) of the concatenated shards
    counts = torch.zeros(comm.world, dtype=torch.float64)
    counts[comm.rank] = float(x_local.shape[0])
    counts = comm.allreduce_sum(counts)
    n_total, offset, n_local = int(counts.sum()), int(counts[:comm.rank].sum()), int(x_local.shape[0])
    batch = int(params.batch_size)
    steps_per_epoch = max(1, math.ceil(n_total / batch))
    dead_after = int(params.dead_after) if params.dead_after else int(n_total)

    opt = torch.optim.Adam(model.parameters(), lr=params.lr, eps=6.25e-10)
    fwd, opt = comm.wrap(model, opt)
    total_steps = steps_per_epoch * int(params.epochs)
    inner_opt = getattr(opt, "opt", opt)  # the Horovod wrapper holds the torch optimizer

    def lr_at(step: int) -> float:
        if params.lr_schedule == "constant":
            return params.lr
        return params.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1))))

    # One GLOBAL shuffle per epoch, drawn identically on every worker: global batch t is the same set of
    # rows whatever the number of workers; each worker processes the rows of it that it holds. Losses are
    # sums scaled by world / |global batch|, so the (averaged) DDP gradient equals the single-process
    # gradient of the same batch exactly -- distributed training follows the single-process trajectory.
    gen = torch.Generator().manual_seed(int(params.seed))
    history, global_step = [], 0
    for epoch in range(int(params.epochs)):
        perm = torch.randperm(n_total, generator=gen)
        ep_sse, ep_rows = 0.0, 0
        for step in range(steps_per_epoch):
            gb = perm[step * batch:(step + 1) * batch]
            mine = gb[(gb >= offset) & (gb < offset + n_local)] - offset
            xb = xn[mine.to(device)]
            for group in inner_opt.param_groups:
                group["lr"] = lr_at(global_step)
            global_step += 1
            dead = model.since_fired >= dead_after
            loss_sum, sse, aux, idx, vals = fwd(xb, dead)
            loss = loss_sum * (comm.world / float(gb.numel()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            comm.after_backward(model)
            model.project_decoder_grad_()
            if params.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            model.renorm_decoder_()
            with torch.no_grad():
                fired = torch.zeros(m, device=device)
                fired[idx[vals > 0]] = 1.0
                fired_any = comm.allreduce_sum(fired) > 0
                model.since_fired += int(gb.numel())
                model.since_fired[fired_any] = 0
            ep_sse += float(sse)
            ep_rows += int(xb.shape[0])
        ep = comm.allreduce_sum(torch.tensor([ep_sse, float(ep_rows)], dtype=torch.float64))
        history.append({"epoch": epoch, "train_mse_normalized_space": float(ep[0] / max(float(ep[1]), 1.0)),
                        "dead_fraction_train": float((model.since_fired >= dead_after).float().mean())})
        if on_epoch is not None and comm.rank == 0:
            on_epoch(epoch, history[-1])
        if log_every and comm.rank == 0 and (epoch + 1) % log_every == 0:
            print(f"[sae] epoch {epoch + 1}/{params.epochs} mse={history[-1]['train_mse_normalized_space']:.4f}")
    model.cpu()
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return {"state": state, "config": {"d_in": d, "n_latents": m, "k": params.k, "aux_k": params.aux_k,
                                       "matryoshka": list(params.matryoshka)},
            "history": history}


def latents_for_corpus(n_documents: int, k: int, docs_per_latent: int, max_latents: int) -> int:
    """Dictionary size from the data: the largest power of two L with n_documents * k / L >= docs_per_latent.

    A TopK code has k active latents per input, so a latent is active on n_documents * k / L documents on average.
    NEXIS can only select a latent that fires on enough *distinct* texts to carry a driver (a latent of a handful
    of documents is a sub-topic or a near-duplicate detector); the rule keeps that average at ``docs_per_latent``
    or more, whatever the corpus size (docs/represent.md, "Choosing the dictionary"). Clipped to
    [max(2k, 16), max_latents]."""
    if n_documents < 1 or k < 1 or docs_per_latent < 1:
        raise ValueError("n_documents, k and docs_per_latent must be positive")
    target = n_documents * k / docs_per_latent
    L = 2 ** int(math.floor(math.log2(target))) if target >= 1 else 1
    return int(min(max(L, 2 * k, 16), max_latents))


# ----------------------------------------------------------------------------------------------
# metrics and sparse-row helpers (shared by SAE and the baselines)
# ----------------------------------------------------------------------------------------------

def reconstruction_metrics(x: np.ndarray, x_hat: np.ndarray, codes: sp.spmatrix | np.ndarray) -> dict:
    """Quality of a representation on data ``x``.

    normalized_mse: sum ||x - x_hat||^2 / sum ||x||^2 (error relative to predicting 0).
    fraction_variance_explained: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (relative to predicting
        the mean; the usual R^2 across all coordinates).
    dead_fraction: share of code dimensions that are never non-zero on ``x``.
    mean_l0: average number of non-zero code entries per row.
    """
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    sse = float(((x - x_hat) ** 2).sum())
    sst0 = float((x ** 2).sum())
    sst = float(((x - x.mean(0)) ** 2).sum())
    if sp.issparse(codes):
        c = sp.csr_matrix(codes)
        c.eliminate_zeros()
        l0 = float(np.diff(c.indptr).mean()) if c.shape[0] else 0.0
        active = np.zeros(c.shape[1], dtype=bool)
        active[c.indices] = True
    else:
        c = np.asarray(codes)
        nz = c != 0
        l0 = float(nz.sum(1).mean()) if c.shape[0] else 0.0
        active = nz.any(0)
    return {
        "normalized_mse": sse / sst0 if sst0 > 0 else float("nan"),
        "fraction_variance_explained": 1.0 - sse / sst if sst > 0 else float("nan"),
        "dead_fraction": float(1.0 - active.mean()) if active.size else float("nan"),
        "mean_l0": l0,
    }


def csr_to_rows(codes: sp.spmatrix) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split a CSR matrix into per-row (indices int32, values float32) arrays (the `neurons` table form)."""
    c = sp.csr_matrix(codes)
    c.sort_indices()
    idx = [c.indices[a:b].astype(np.int32) for a, b in zip(c.indptr[:-1], c.indptr[1:])]
    val = [c.data[a:b].astype(np.float32) for a, b in zip(c.indptr[:-1], c.indptr[1:])]
    return idx, val


def rows_to_csr(indices, values, n_cols: int) -> sp.csr_matrix:
    """Inverse of :func:`csr_to_rows` (accepts lists of arrays/lists, e.g. read back from a table)."""
    lens = np.array([len(i) for i in indices], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    flat_i = np.concatenate([np.asarray(i, dtype=np.int32) for i in indices]) if len(indices) else np.zeros(0, np.int32)
    flat_v = np.concatenate([np.asarray(v, dtype=np.float32) for v in values]) if len(values) else np.zeros(0, np.float32)
    if flat_i.size and (flat_i.min() < 0 or flat_i.max() >= n_cols):
        raise ValueError(f"neuron index out of range [0, {n_cols})")
    return sp.csr_matrix((flat_v, flat_i, indptr), shape=(len(indices), int(n_cols)))


def _check_x(X, d: int | None = None) -> np.ndarray:
    if sp.issparse(X):
        X = X.toarray()
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows x dim), got shape {X.shape}")
    if d is not None and X.shape[1] != d:
        raise ValueError(f"X has {X.shape[1]} columns, the model was fitted on {d}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


# ----------------------------------------------------------------------------------------------
# sklearn-ish wrapper
# ----------------------------------------------------------------------------------------------

class SparseAutoencoder:
    """scikit-learn-style TopK SAE: ``fit(X)``, ``encode(X) -> csr_matrix``, ``decode(Z)``, ``save/load``.

    >>> sae = SparseAutoencoder(n_latents=256, k=8, epochs=20).fit(X)
    >>> Z = sae.encode(X)            # scipy.sparse.csr_matrix, <= k non-zeros per row
    >>> sae.metrics(X)               # normalized_mse, fraction_variance_explained, dead_fraction, mean_l0
    """

    kind = "sae"

    def __init__(self, n_latents: int | None = None, k: int = 32, lr: float = 1e-3, epochs: int = 10,
                 batch_size: int = 256, seed: int = 0, expansion: int = 8, aux_k: int = 64,
                 aux_coef: float = 1.0 / 32.0, dead_after: int | None = None, device: str = "cpu",
                 num_threads: int | None = None, lr_schedule: str = "cosine", matryoshka=()):
        self.n_latents = n_latents
        self.k = k
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.expansion = expansion
        self.aux_k = aux_k
        self.aux_coef = aux_coef
        self.dead_after = dead_after
        self.device = device
        self.num_threads = num_threads
        self.lr_schedule = lr_schedule
        self.matryoshka = tuple(matryoshka or ())

    # -- params ----------------------------------------------------------------------------
    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("n_latents", "k", "lr", "epochs", "batch_size", "seed",
                                               "expansion", "aux_k", "aux_coef", "dead_after", "device",
                                               "num_threads", "lr_schedule", "matryoshka")}

    def sae_params(self) -> SAEParams:
        return SAEParams(**self.get_params()).validate()

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None) -> "SparseAutoencoder":
        X = _check_x(X)
        result = train_loop(X, self.sae_params())
        return self._set_result(result)

    def _set_result(self, result: dict) -> "SparseAutoencoder":
        torch = _torch()
        cfg = result["config"]
        model = TopKSAE(cfg["d_in"], cfg["n_latents"], cfg["k"], aux_k=cfg.get("aux_k", 0), aux_coef=self.aux_coef,
                        prefixes=cfg.get("matryoshka", ()))
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in result["state"].items()})
        model.eval()
        self.module_ = model
        self.n_features_in_ = int(cfg["d_in"])
        self.n_latents_ = int(cfg["n_latents"])
        self.history_ = list(result.get("history", []))
        return self

    @classmethod
    def from_result(cls, result: dict, params: SAEParams) -> "SparseAutoencoder":
        """Wrap the output of :func:`train_loop` / ``train_distributed``."""
        kw = {k: v for k, v in asdict(params).items() if k in cls().get_params()}
        return cls(**kw)._set_result(result)

    def _check_fitted(self):
        if not hasattr(self, "module_"):
            raise ValueError("this SparseAutoencoder is not fitted yet: call fit(X) or load(path) first")

    # -- inference -------------------------------------------------------------------------
    def _batches(self, X, batch_rows: int = 4096):
        torch = _torch()
        for a in range(0, X.shape[0], batch_rows):
            yield a, torch.from_numpy(X[a:a + batch_rows])

    def encode(self, X, batch_rows: int = 4096) -> sp.csr_matrix:
        """Sparse codes (rows x n_latents), exactly the top-k ReLU activations."""
        self._check_fitted()
        torch = _torch()
        X = _check_x(X, self.n_features_in_)
        m, k = self.n_latents_, self.module_.k
        rows, cols, vals = [], [], []
        with torch.no_grad():
            for a, xb in self._batches(X, batch_rows):
                pre = self.module_.pre_activations(self.module_.normalize(xb))
                v, i = self.module_.topk(pre)
                rows.append(np.repeat(np.arange(a, a + xb.shape[0]), k))
                cols.append(i.numpy().reshape(-1))
                vals.append(v.numpy().reshape(-1))
        if not rows:
            return sp.csr_matrix((0, m), dtype=np.float32)
        Z = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(X.shape[0], m), dtype=np.float32)
        Z.eliminate_zeros()
        Z.sort_indices()
        return Z

    transform = encode

    def pre_activations(self, X, batch_rows: int = 4096) -> np.ndarray:
        """Dense encoder scores before TopK (rows x n_latents); used for least-activating examples."""
        self._check_fitted()
        torch = _torch()
        X = _check_x(X, self.n_features_in_)
        out = np.empty((X.shape[0], self.n_latents_), dtype=np.float32)
        with torch.no_grad():
            for a, xb in self._batches(X, batch_rows):
                out[a:a + xb.shape[0]] = self.module_.pre_activations(self.module_.normalize(xb)).numpy()
        return out

    scores = pre_activations

    def decode(self, Z) -> np.ndarray:
        """Reconstruction in the original input space from codes (sparse or dense)."""
        self._check_fitted()
        mod = self.module_
        D = mod.W_dec.detach().numpy()
        if sp.issparse(Z):
            Z = sp.csr_matrix(Z, dtype=np.float32)
            xn = np.asarray(Z @ D)
        else:
            Z = np.asarray(Z, dtype=np.float32)
            if Z.ndim != 2 or Z.shape[1] != self.n_latents_:
                raise ValueError(f"codes must be rows x {self.n_latents_}, got shape {Z.shape}")
            xn = Z @ D
        if xn.shape[1] != self.n_features_in_:
            raise ValueError(f"codes must have {self.n_latents_} columns")
        xn = xn + mod.b_pre.detach().numpy()
        return (xn * mod.scale.numpy() + mod.mean.numpy()).astype(np.float32)

    def reconstruct(self, X) -> np.ndarray:
        return self.decode(self.encode(X))

    def metrics(self, X) -> dict:
        """normalized_mse, fraction_variance_explained, dead_fraction, mean_l0 on X (see
        :func:`reconstruction_metrics`)."""
        X = _check_x(X, getattr(self, "n_features_in_", None))
        Z = self.encode(X)
        return reconstruction_metrics(X, self.decode(Z), Z)

    @property
    def dictionary_(self) -> np.ndarray:
        """Unit-norm atoms, shape (n_latents, d), in the normalized input space."""
        self._check_fitted()
        return self.module_.W_dec.detach().numpy().copy()

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        self._check_fitted()
        return {"params": self.get_params(),
                "config": {"d_in": self.n_features_in_, "n_latents": self.n_latents_, "k": self.module_.k,
                           "aux_k": self.module_.aux_k, "matryoshka": list(self.module_.prefixes)},
                "state": {k: v.detach().cpu().numpy() for k, v in self.module_.state_dict().items()},
                "history": self.history_}

    def save(self, path: str) -> str:
        """Write ``sae.pt`` (weights, normalization mean/scale, dead-latent counters) and
        ``sae.json`` (k, sizes, hyper-parameters) into directory ``path``."""
        torch = _torch()
        st = self.state()
        os.makedirs(path, exist_ok=True)
        torch.save({k: torch.as_tensor(v) for k, v in st["state"].items()}, os.path.join(path, "sae.pt"))
        with open(os.path.join(path, "sae.json"), "w") as f:
            json.dump({"kind": self.kind, "params": st["params"], "config": st["config"],
                       "history": st["history"]}, f, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> "SparseAutoencoder":
        torch = _torch()
        with open(os.path.join(path, "sae.json")) as f:
            meta = json.load(f)
        if meta.get("kind", "sae") != cls.kind:
            raise ValueError(f"{path} holds a {meta.get('kind')!r} representation, not an SAE")
        state = torch.load(os.path.join(path, "sae.pt"), map_location="cpu", weights_only=True)
        obj = cls(**meta["params"])
        return obj._set_result({"state": {k: v.numpy() for k, v in state.items()}, "config": meta["config"],
                                "history": meta.get("history", [])})
