"""One writing pipeline per lakehouse: a lease committed to the ``run_lock`` Delta table.

The holder's row (owner, host, pid, what it runs, acquired/renewed/expires times) is taken with a Delta MERGE that
only inserts when there is no row, or replaces the exact row the taker saw when that row was stale: Delta's
optimistic concurrency lets exactly one of two concurrent takers commit, and a taker whose MERGE changed nothing
reads back the winner. A background thread renews the lease every third of ``runner.lease_seconds``; a pipeline
that stops renewing (killed, hung, cut off) loses it when ``expires_at`` passes, and a lease held by a process that
no longer exists on this host is stale at once. Release deletes the row.

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
    """A concurrent Delta commit beat ours (or created the table first): read again and retry."""
    text = f"{type(exc).__name__}: {exc}"
    return any(k in text for k in ("Concurrent", "concurrent", "already exists", "FileAlreadyExists",
                                    "ProtocolChanged", "MetadataChanged", "DELTA_"))


class RunLock:
    """The run lock of one lakehouse. ``acquire()`` waits up to ``wait_seconds`` (then raises
    :class:`LockHeldError`), ``release()`` gives it back; ``lost`` turns True when a renewal finds the lease gone."""

    def __init__(self, spark, config: Config, command: str = "", wait_seconds: Optional[float] = None,
                 lease_seconds: Optional[float] = None, echo: Callable[[str], None] = print):
        self.spark, self.config, self.echo = spark, config, echo
        self.command = command[:200]
        self.wait_seconds = config.runner.lock_wait_seconds if wait_seconds is None else float(wait_seconds)
        self.lease_seconds = config.runner.lease_seconds if lease_seconds is None else float(lease_seconds)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._acquired_at = 0.0

    # -- reading --------------------------------------------------------------------------------------------
    def _rows(self):
        """Every lease row, earliest taken first (None when the table does not exist yet)."""
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import read_table, table_exists

        if not table_exists(self.spark, self.config, LOCK_TABLE):
            return None
        df = read_table(self.spark, self.config, LOCK_TABLE).where(F.col("lock") == LOCK_NAME)
        ts = [F.col(c).cast("double").alias(c) for c in ("acquired_at", "renewed_at", "expires_at")]
        rows = df.select("owner", "host", F.col("pid").cast("long").alias("pid"), "command", *ts).collect()
        leases = [Lease(r.owner, r.host, int(r.pid), r.command or "", r.acquired_at, r.renewed_at, r.expires_at)
                  for r in rows]
        return sorted(leases, key=lambda lease: (lease.acquired_at, lease.owner))

    def holder(self) -> Optional[Lease]:
        """The current lease (the earliest taken, should two rows ever exist), stale or not; None when free."""
        rows = self._rows()
        return rows[0] if rows else None  # the earliest row holds; a later duplicate is deleted by its owner

    def live_holder(self) -> Optional[Lease]:
        """The lease of another pipeline that still holds the lock, else None."""
        lease = self.holder()
        if lease is None or lease.owner == self.owner or is_stale(lease, host=self.host):
            return None
        return lease

    # -- writing --------------------------------------------------------------------------------------------
    def _frame(self, now: float):
        from tokens2policy.lakehouse.schemas import table_spec

        ts = _dt.datetime.fromtimestamp
        row = (LOCK_NAME, self.owner, self.host, int(self.pid), self.command, ts(self._acquired_at or now),
               ts(now), ts(now + self.lease_seconds))
        return self.spark.createDataFrame([row], table_spec(LOCK_TABLE).schema())

    def _ensure_table(self) -> None:
        from tokens2policy.lakehouse.tables import table_exists, write_table

        for _ in range(20):
            if table_exists(self.spark, self.config, LOCK_TABLE):
                return
            try:  # an empty append: two creators both succeed or one fails harmlessly, no row is lost
                write_table(self._frame(time.time()).limit(0), self.config, LOCK_TABLE, mode="append")
                return
            except Exception as exc:  # noqa: BLE001 - a concurrent creator; look again
                if not _is_conflict(exc):
                    raise
                time.sleep(0.5)

    def _try_take(self, seen: Optional[Lease]) -> None:
        """One MERGE: insert our row when there is none; replace ``seen`` (stale) only if it is still there."""
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import delta_table

        now = time.time()
        self._acquired_at = now
        target = delta_table(self.spark, self.config, LOCK_TABLE).alias("t")
        merge = target.merge(self._frame(now).alias("s"), F.col("t.lock") == F.col("s.lock"))
        if seen is not None:
            same = ((F.col("t.owner") == F.lit(seen.owner))
                    & (F.col("t.renewed_at").cast("double") == F.lit(seen.renewed_at)))
            merge = merge.whenMatchedUpdateAll(condition=same)
        merge.whenNotMatchedInsertAll().execute()

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        deadline = time.time() + self.wait_seconds
        announced = False
        rows = self._rows()
        while True:
            if rows is None:
                self._ensure_table()
                rows = []
            lease = rows[0] if rows else None
            if lease is None or lease.owner == self.owner or is_stale(lease, host=self.host):
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
                if any(r.owner == self.owner for r in rows):  # two first takers at once: the earlier one holds
                    self._delete_own()
            if lease is not None and lease.owner != self.owner and not is_stale(lease, host=self.host):
                if time.time() >= deadline:
                    raise LockHeldError(
                        f"another pipeline is writing this lakehouse: {lease.describe()}; wait for it to finish, "
                        f"or --set runner.lock_wait_seconds=N to wait (a killed holder's lease expires after "
                        f"runner.lease_seconds={self.lease_seconds:g})")
                if not announced:
                    self.echo(f"[t2p] waiting for the run lock: {lease.describe()}")
                    announced = True
                time.sleep(min(2.0, max(0.2, deadline - time.time())))
            rows = self._rows()

    def _delete_own(self) -> None:
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import delta_table

        delta_table(self.spark, self.config, LOCK_TABLE).delete(
            (F.col("lock") == F.lit(LOCK_NAME)) & (F.col("owner") == F.lit(self.owner)))

    def renew(self) -> bool:
        """Extend our lease; False (and ``lost``) when it is no longer ours."""
        from pyspark.sql import functions as F

        from tokens2policy.lakehouse.tables import delta_table

        now = time.time()
        ts = _dt.datetime.fromtimestamp
        delta_table(self.spark, self.config, LOCK_TABLE).update(
            (F.col("lock") == F.lit(LOCK_NAME)) & (F.col("owner") == F.lit(self.owner)),
            {"renewed_at": F.lit(ts(now)), "expires_at": F.lit(ts(now + self.lease_seconds))})
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
            self._delete_own()
        except Exception as exc:  # noqa: BLE001 - the lease expires anyway
            self.echo(f"[t2p] could not release the run lock ({type(exc).__name__}); it expires after "
                      f"{self.lease_seconds:g}s")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
