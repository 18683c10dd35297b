"""One writing pipeline per lakehouse: a lease committed to the ``run_lock`` Delta table.

The table holds one row per lock (created holding the first taker's lease, never deleted). A pipeline takes the
lease with one Delta UPDATE whose condition is "the row is free, or still exactly the stale lease I saw": Delta's
optimistic concurrency lets only one of two concurrent takers commit (the other's commit conflicts and it reads
again), and a taker whose UPDATE matched nothing reads back who won. A background thread renews the lease every
third of ``runner.lease_seconds``; a pipeline that stops renewing (killed, hung, cut off) loses it when
``expires_at`` passes, and a lease held by a process that no longer exists on this host is stale at once. Release
frees the row (owner null).

Every check compares instants (epoch seconds), so the hosts' clocks must roughly agree (well within the lease).
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from tokens2policy.config import Config

LOCK_TABLE = "run_lock"
LOCK_NAME = "pipeline"


class LockHeldError(RuntimeError):
    """Another pipeline holds the lakehouse's run lock (the message names it)."""


class LeaseLostError(RuntimeError):
    """This pipeline's lease expired or was taken over while it ran."""


@dataclass(frozen=True)
class Lease:
    owner: str
    host: str
    pid: int
    command: str
    acquired_at: float  # epoch seconds
    renewed_at: float
    expires_at: float

    def describe(self) -> str:
        since = _dt.datetime.fromtimestamp(self.acquired_at).isoformat(timespec="seconds")
        until = _dt.datetime.fromtimestamp(self.expires_at).isoformat(timespec="seconds")
        return f"pid {self.pid} on {self.host} ({self.command}), since {since}, lease until {until}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def is_stale(lease: Lease, now: Optional[float] = None, host: Optional[str] = None) -> bool:
    """Past its expiry, or held by a process that no longer exists on this host."""
    now = time.time() if now is None else now
    if lease.expires_at < now:
        return True
    return lease.host == (host or socket.gethostname()) and not _pid_alive(lease.pid)


def _is_conflict(exc: BaseException) -> bool:
    """A concurrent Delta commit beat ours (or created the table first): read again and retry. Anything else (a
    broken table, a missing jar) is a real error and propagates."""
    try:
        from delta.exceptions import DeltaConcurrentModificationException
        from delta.exceptions.base import (ConcurrentAppendException, ConcurrentDeleteDeleteException,
                                           ConcurrentDeleteReadException, ConcurrentTransactionException,
                                           ConcurrentWriteException, MetadataChangedException,
                                           ProtocolChangedException)

        if isinstance(exc, (DeltaConcurrentModificationException, ConcurrentAppendException,
                            ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
                            ConcurrentTransactionException, ConcurrentWriteException, MetadataChangedException,
                            ProtocolChangedException)):
            return True
    except ImportError:  # pragma: no cover - delta-spark is a dependency
        pass
    text = f"{type(exc).__name__}: {exc}"
    return any(k in text for k in ("ConcurrentAppend", "ConcurrentDelete", "ConcurrentWrite", "ConcurrentTransaction",
                                    "DELTA_CONCURRENT", "MetadataChanged", "ProtocolChanged", "FileAlreadyExists",
                                    "already exists", "DELTA_PATH_EXISTS", "TABLE_OR_VIEW_ALREADY_EXISTS"))


class RunLock:
    """The run lock of one lakehouse. ``acquire()`` waits up to ``wait_seconds`` (then raises
    :class:`LockHeldError`), ``release()`` gives it back; ``lost`` turns True when a renewal finds the lease gone."""

    def __init__(self, spark, config: Config, command: str = "", wait_seconds: Optional[float] = None,
                 lease_seconds: Optional[float] = None, echo: Callable[[str], None] = print,
                 break_lock: Optional[bool] = None):
        self.spark, self.config, self.echo = spark, config, echo
        self.command = command[:200]
        self.wait_seconds = config.runner.lock_wait_seconds if wait_seconds is None else float(wait_seconds)
        self.lease_seconds = config.runner.lease_seconds if lease_seconds is None else float(lease_seconds)
        self.break_lock = config.runner.break_lock if break_lock is None else bool(break_lock)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._break_owner: Optional[str] = None

    # -- reading --------------------------------------------------------------------------------------------
    def _rows(self):
        """The held leases (rows with an owner), earliest taken first; None when the table does not exist yet."""
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import read_table, table_exists

        if not table_exists(self.spark, self.config, LOCK_TABLE):
            return None
        df = read_table(self.spark, self.config, LOCK_TABLE).where(
            (F.col("lock") == LOCK_NAME) & F.col("owner").isNotNull())
        ts = [F.col(c).cast("double").alias(c) for c in ("acquired_at", "renewed_at", "expires_at")]
        rows = df.select("owner", "host", F.col("pid").cast("long").alias("pid"), "command", *ts).collect()
        leases = [Lease(r.owner, r.host, int(r.pid), r.command or "", r.acquired_at, r.renewed_at, r.expires_at)
                  for r in rows]
        return sorted(leases, key=lambda lease: (lease.acquired_at, lease.owner))

    def holder(self) -> Optional[Lease]:
        """The current lease, stale or not; None when the lock is free."""
        rows = self._rows()
        return rows[0] if rows else None

    def live_holder(self) -> Optional[Lease]:
        """The lease of another pipeline that still holds the lock, else None."""
        lease = self.holder()
        return lease if lease is not None and not self._may_take(lease) else None

    def _may_take(self, lease: Optional[Lease]) -> bool:
        """Free, ours, stale, or (``break_lock``) the holder this ``acquire`` found first: its exact row may be
        replaced by ours. Only that first holder is broken, so two breakers never take the lock from each other."""
        return (lease is None or lease.owner == self.owner or is_stale(lease, host=self.host)
                or (self._break_owner is not None and lease.owner == self._break_owner))

    # -- writing --------------------------------------------------------------------------------------------
    def _ensure_table(self) -> None:
        """Create the table with the lock's row already holding our lease (one commit, no UPDATE after it).

        The write is ``errorifexists``: Delta refuses it when the table exists at the transaction's start, and two
        creators racing for version 0 conflict at commit (the second sees a concurrent metadata change), so
        exactly one creator's row is ever written — the others find the table and take the normal path (they may
        not simply append theirs: two lease rows would leave nothing but clocks to decide between them)."""
        from tokens2policy.lakehouse.schemas import table_spec
        from tokens2policy.lakehouse.tables import table_exists, write_table

        schema = table_spec(LOCK_TABLE).schema()
        now = time.time()
        ts = _dt.datetime.fromtimestamp
        row = {"lock": LOCK_NAME, "owner": self.owner, "host": self.host, "pid": int(self.pid),
               "command": self.command, "acquired_at": ts(now), "renewed_at": ts(now),
               "expires_at": ts(now + self.lease_seconds)}
        ours = self.spark.createDataFrame([tuple(row[f.name] for f in schema.fields)], schema)
        for _ in range(20):
            if table_exists(self.spark, self.config, LOCK_TABLE):
                return
            try:
                write_table(ours, self.config, LOCK_TABLE, mode="errorifexists")
                return
            except Exception as exc:  # noqa: BLE001 - a concurrent creator; look again
                if not _is_conflict(exc):
                    raise
                time.sleep(0.5)

    def _update(self, condition, values: dict) -> None:
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import delta_table

        delta_table(self.spark, self.config, LOCK_TABLE).update((F.col("lock") == F.lit(LOCK_NAME)) & condition,
                                                                  values)

    def _lease_values(self, now: float, acquired: bool = False) -> dict:
        from pyspark.sql import functions as F

        ts = _dt.datetime.fromtimestamp
        values = {"renewed_at": F.lit(ts(now)), "expires_at": F.lit(ts(now + self.lease_seconds))}
        if acquired:
            values.update({"owner": F.lit(self.owner), "host": F.lit(self.host), "pid": F.lit(int(self.pid)),
                           "command": F.lit(self.command), "acquired_at": F.lit(ts(now))})
        return values

    def _try_take(self, seen: Optional[Lease]) -> None:
        """One UPDATE: take the row if it is free, ours, or still exactly the stale lease ``seen``."""
        from pyspark.sql import functions as F

        free = F.col("owner").isNull() | (F.col("owner") == F.lit(self.owner))
        if seen is not None:
            free = free | ((F.col("owner") == F.lit(seen.owner))
                           & (F.col("renewed_at").cast("double") == F.lit(seen.renewed_at)))
        self._update(free, self._lease_values(time.time(), acquired=True))

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        deadline = time.time() + self.wait_seconds
        announced = False
        rows = self._rows()
        if self.break_lock and rows:
            self._break_owner = rows[0].owner
        while True:
            if rows is None:
                self._ensure_table()  # with our lease in it, unless another pipeline created it first
                rows = self._rows() or []
            lease = rows[0] if rows else None
            if lease is not None and lease.owner == self.owner and not is_stale(lease, host=self.host):
                self.held = True  # the table was created holding our lease
                self._start_renewing()
                return self
            if self._may_take(lease):
                if lease is not None and lease.owner != self.owner:
                    why = "breaking (runner.break_lock=true)" if not is_stale(lease, host=self.host) else \
                        "taking over the stale"
                    self.echo(f"[t2p] {why} run lock of {lease.describe()}")
                try:
                    self._try_take(lease)
                except Exception as exc:  # noqa: BLE001 - a concurrent taker won this round
                    if not _is_conflict(exc):
                        raise
                rows = self._rows() or []
                lease = rows[0] if rows else None
                if lease is not None and lease.owner == self.owner:
                    self.held = True
                    self._start_renewing()
                    return self
                if any(r.owner == self.owner for r in rows):  # two lock rows (two first creators): the earlier
                    self._free_own()                              # lease holds, ours is given back
            if lease is not None and not self._may_take(lease):
                if time.time() >= deadline:
                    raise LockHeldError(
                        f"another pipeline is writing this lakehouse: {lease.describe()}; wait for it to finish, "
                        f"or --set runner.lock_wait_seconds=N to wait (a killed holder's lease expires after "
                        f"runner.lease_seconds={self.lease_seconds:g}; --set runner.break_lock=true takes it "
                        f"over now if you know it is gone)")
                if not announced:
                    self.echo(f"[t2p] waiting for the run lock: {lease.describe()}")
                    announced = True
                time.sleep(min(2.0, max(0.2, deadline - time.time())))
            rows = self._rows()

    def _free_own(self) -> None:
        from pyspark.sql import functions as F

        nothing = {c: F.lit(None).cast(t) for c, t in (("owner", "string"), ("host", "string"), ("pid", "bigint"),
                                                      ("command", "string"), ("acquired_at", "timestamp"),
                                                      ("renewed_at", "timestamp"), ("expires_at", "timestamp"))}
        self._update(F.col("owner") == F.lit(self.owner), nothing)

    def renew(self) -> bool:
        """Extend our lease; False (and ``lost``) when it is no longer ours."""
        from pyspark.sql import functions as F

        self._update(F.col("owner") == F.lit(self.owner), self._lease_values(time.time()))
        lease = self.holder()
        if lease is None or lease.owner != self.owner:
            self.lost = True
        return not self.lost

    def _start_renewing(self) -> None:
        self._stop.clear()

        def loop():
            while not self._stop.wait(self.lease_seconds / 3.0):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease says how long we have
                    lease = None
                    try:
                        lease = self.holder()
                    except Exception:  # noqa: BLE001
                        pass
                    if lease is not None and lease.owner == self.owner and lease.expires_at < time.time():
                        self.lost = True
                        return

        self._thread = threading.Thread(target=loop, name="t2p-run-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease was lost (called between stages)."""
        if self.lost:
            raise LeaseLostError("this pipeline lost the run lock (its lease expired or another pipeline took it "
                                 "over); stopping before anything else is written")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.held = False
        try:
            self._free_own()
        except Exception as exc:  # noqa: BLE001 - the lease expires anyway
            self.echo(f"[t2p] could not release the run lock ({type(exc).__name__}); it expires after "
                      f"{self.lease_seconds:g}s")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
