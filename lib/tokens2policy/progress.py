"""Progress on the driver: task counts and an ETA for the Spark jobs a block starts, and for driver-side loops.

    with spark_progress(spark, "embed: 2,225 texts through the model"):
        df.write...                                   # every Spark job started in the block is counted
    for epoch in progress(range(epochs), "represent: SAE epochs", unit="epoch"):
        ...

:func:`spark_progress` tags the jobs started inside the block (``SparkContext.addJobTag``, thread-local, so jobs of
other threads are not counted and an enclosing job group is left alone) and polls Spark's status tracker from a
daemon thread: completed / total tasks over the stages of those jobs. The total covers the jobs started *so far*
(Spark cannot know the jobs a block will start later), so with several jobs the bar's total grows as they start;
the ETA is tqdm's (smoothed rate over the remaining known tasks). Stages that Spark skips (shuffle output reused)
drop out of the total when their job ends.

Where the output goes is set by ``T2P_PROGRESS`` (``t2p run --progress`` sets it):

* ``auto`` (default): a tqdm bar on stderr when stderr is a terminal, ``tqdm.auto``'s widget in a notebook
  (Jupyter, Databricks), otherwise sparse lines (``log``), so CI and job logs are not flooded;
* ``bar`` (or ``1``): always a bar; ``log``: one line every ``T2P_PROGRESS_EVERY`` seconds (default 30) with counts
  and ETA, plus a final line; ``off`` (or ``0``): nothing.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys
import threading
import time
import uuid
from typing import Iterable, Iterator, Optional, TextIO

_OFF = ("0", "off", "false", "no", "none")
_BAR = ("1", "on", "true", "yes", "bar", "tqdm")
_LOG = ("log", "lines", "line", "text")
DEFAULT_EVERY = 30.0
_local = threading.local()  # spark_progress blocks active in this thread (nested blocks are silent)
_counter = itertools.count()


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # pragma: no cover - exotic IPython builds
        return False
    if shell is None:
        return False
    return "IPKernelApp" in getattr(shell, "config", {}) or "DATABRICKS_RUNTIME_VERSION" in os.environ


def progress_mode(stream: Optional[TextIO] = None) -> str:
    """``bar``, ``notebook``, ``log`` or ``off`` from ``T2P_PROGRESS`` and where the output goes."""
    raw = os.environ.get("T2P_PROGRESS", "auto").strip().lower()
    if raw in _OFF:
        return "off"
    if raw in _LOG:
        return "log"
    if raw in _BAR:
        return "bar"
    if raw not in ("", "auto"):
        raise ValueError(f"T2P_PROGRESS={raw!r}: use auto, bar, log or off")
    if stream is None and _in_notebook():
        return "notebook"
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


def log_every() -> float:
    """Seconds between two progress lines in ``log`` mode (``T2P_PROGRESS_EVERY``, default 30)."""
    raw = os.environ.get("T2P_PROGRESS_EVERY", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_EVERY
    except ValueError:
        raise ValueError(f"T2P_PROGRESS_EVERY={raw!r}: give a number of seconds") from None


def _has_size(stream) -> bool:
    """Whether ``stream`` is a terminal that reports its size (a pty may say 0 x 0, and tqdm then draws nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return True  # not a terminal: tqdm falls back to its defaults
    return size.columns > 0 and size.lines > 0


def _clock(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


class Progress:
    """Counts of one unit of work with an ETA, rendered as a tqdm bar, as sparse log lines, or not at all.

    Iterate over it (``for x in progress(items, ...)``), or drive it: ``update(n)``, ``set_counts(done, total)``,
    ``note(text)``, then ``close()`` (or use it as a context manager). ``n``, ``total`` and ``seconds`` say where
    it stands whatever the mode.
    """

    def __init__(self, iterable: Optional[Iterable] = None, description: str = "", total: Optional[int] = None,
                 unit: str = "it", mode: Optional[str] = None, stream: Optional[TextIO] = None,
                 every: Optional[float] = None, open_ended: bool = False):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.description, self.unit = iterable, description, unit
        self.total = None if total is None else int(total)
        self.n, self.extra, self.failed, self.closed = 0, "", False, False
        self.open_ended = bool(open_ended)  # the total keeps growing: show counts and rate, no percentage or ETA
        self.mode = mode or progress_mode(stream)
        if self.mode not in ("bar", "notebook", "log", "off"):
            raise ValueError(f"progress mode must be bar, notebook, log or off, got {self.mode!r}")
        self.stream = stream or sys.stderr
        self.every = log_every() if every is None else float(every)
        self.started = self._last_line = time.monotonic()
        self._ended: Optional[float] = None
        self._lock = threading.Lock()
        self._bar = None
        if self.mode in ("bar", "notebook"):
            if self.mode == "notebook":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            size = {} if _has_size(self.stream) else {"ncols": 100, "nrows": 20}  # a 0x0 pty hides tqdm's bar
            self._bar = tqdm(total=None if self.open_ended else self.total, desc=description, unit=unit,
                             file=self.stream, leave=True, dynamic_ncols=not size, mininterval=0.5, **size)

    # -- driving it ---------------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.set_counts(self.n + int(n), self.total)

    def set_counts(self, done: int, total: Optional[int]) -> None:
        """Absolute counts (a poller's view): ``done`` of ``total`` units so far."""
        with self._lock:
            if self.closed:
                return
            done = int(done)
            total = None if total is None else max(int(total), done)
            step, self.n, self.total = done - self.n, done, total
            if self._bar is not None:
                if not self.open_ended and self._bar.total != total:
                    self._bar.total = total
                if step > 0:
                    self._bar.update(step)
                else:
                    self._bar.refresh()
            elif self.mode == "log" and time.monotonic() - self._last_line >= self.every:
                self._line()

    def note(self, text: str) -> None:
        """A short status after the counts (``3 jobs``)."""
        with self._lock:
            self.extra = text
            if self._bar is not None and not self.closed:
                self._bar.set_postfix_str(text, refresh=False)

    @property
    def seconds(self) -> float:
        return (self._ended or time.monotonic()) - self.started

    def eta(self) -> Optional[float]:
        """Seconds left at the average rate so far (None while nothing is done or the total is unknown)."""
        if not self.total or self.n <= 0 or self.open_ended:
            return None
        return (self.total - self.n) * self.seconds / self.n

    def summary(self) -> str:
        """One line: ``desc: 3/7 tasks (43%), 2 jobs — 00:12 elapsed, ETA 00:16``."""
        unit = self.unit if self.unit == "it" else self.unit + "s"
        shown = None if self.open_ended else self.total
        counts = f"{self.n}/{shown} {unit}" if shown else f"{self.n} {unit}"
        extra = f", {self.extra}" if self.extra else ""
        if self.closed:
            verb = "stopped after" if self.failed else "done in"
            return f"[t2p] {self.description}: {counts}{extra} — {verb} {_clock(self.seconds)}"
        pct = f" ({100.0 * self.n / shown:.0f}%)" if shown else ""
        eta = self.eta()
        tail = f", ETA {_clock(eta)}" if eta is not None else ""
        return f"[t2p] {self.description}: {counts}{pct}{extra} — {_clock(self.seconds)} elapsed{tail}"

    def _line(self) -> None:
        print(self.summary(), file=self.stream, flush=True)
        self._last_line = time.monotonic()

    def close(self, failed: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed, self.failed, self._ended = True, bool(failed), time.monotonic()
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "log":
                self._line()

    # -- protocols ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; call update() instead")
        ok = False
        try:
            for item in self.iterable:
                yield item
                self.update(1)
            ok = True
        finally:
            self.close(failed=not ok)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def progress(iterable: Optional[Iterable] = None, description: str = "", total: Optional[int] = None,
             unit: str = "it", **kwargs) -> Progress:
    """Progress of a driver-side loop: ``for epoch in progress(range(n), "represent: SAE epochs", unit="epoch")``.

    Without an iterable, drive it by hand: ``with progress(total=n, description=...) as p: ... p.update()``.
    ``mode``/``stream``/``every`` override ``T2P_PROGRESS``, stderr and ``T2P_PROGRESS_EVERY``.
    """
    return Progress(iterable, description, total=total, unit=unit, **kwargs)


class SparkProgress(Progress):
    """A :class:`Progress` whose counts are the tasks of the Spark jobs tagged ``tag``, polled from the driver."""

    def __init__(self, spark, description: str, note: str = "", poll: float = 0.5, **kwargs):
        super().__init__(None, description, unit="task", **kwargs)
        self.label = note
        self.sc = spark.sparkContext
        self.tag = f"t2p-progress-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
        self.poll = float(poll)
        self.job_ids: list = []
        self._frozen: dict = {}  # finished job -> (completed, total): survives eviction from Spark's status store
        self._tracker = self.sc.statusTracker()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def jobs(self) -> int:
        return len(self.job_ids)

    def set_label(self, text: str) -> None:
        """Replace the status shown after the job count (e.g. the search's current round), from the next poll."""
        self.label = text

    def _tagged_job_ids(self) -> list:
        return sorted(int(j) for j in self.sc._jsc.sc().statusTracker().getJobIdsForTag(self.tag))

    def refresh_counts(self) -> None:
        """One poll: completed and total tasks over the stages of every tagged job."""
        ids = self._tagged_job_ids()
        seen = sorted(set(ids) | set(self._frozen))
        done = total = 0
        for jid in seen:
            if jid in self._frozen:
                d, t = self._frozen[jid]
            else:
                info = self._tracker.getJobInfo(jid)
                if info is None:
                    continue
                stages = [s for s in (self._tracker.getStageInfo(sid) for sid in info.stageIds) if s is not None]
                d = sum(s.numCompletedTasks for s in stages)
                t = sum(s.numTasks for s in stages)
                if info.status == "SUCCEEDED":  # skipped stages never run: the job's total is what completed
                    self._frozen[jid] = (d, d)
                    t = d
                elif info.status == "FAILED":
                    self._frozen[jid] = (d, t)
            done, total = done + d, total + t
        self.job_ids = seen
        jobs = f"{len(seen)} job{'s' if len(seen) != 1 else ''}"
        self.note(f"{jobs}, {self.label}" if self.label else jobs)
        self.set_counts(done, total if seen else None)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.refresh_counts()
            except Exception:  # the JVM going away (shutdown, ^C) must not print a traceback from this thread
                return

    def start(self) -> "SparkProgress":
        if self.label:
            self.note(self.label)
            if self._bar is not None:
                self._bar.refresh()
        self.sc.addJobTag(self.tag)
        self._thread = threading.Thread(target=self._run, name=f"t2p-progress:{self.description}", daemon=True)
        self._thread.start()
        return self

    def stop(self, failed: bool = False) -> None:
        """Stop polling, take the final counts (after Spark's listener caught up) and close the bar."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for step in (lambda: self.sc.removeJobTag(self.tag),
                     # the status store is fed asynchronously: let it see the jobs' ends first
                     lambda: self.sc._jsc.sc().listenerBus().waitUntilEmpty(1000 if failed else 5000),
                     self.refresh_counts):
            try:
                step()
            except Exception:  # a stopped JVM, a listener that is slow to drain: keep the counts we have
                pass
        self.close(failed=failed)


class _Silent:
    """What a nested or disabled ``spark_progress`` block yields: the same attributes, no polling."""

    n, total, jobs, job_ids, seconds, mode = 0, None, 0, [], 0.0, "off"

    def note(self, text: str) -> None:
        pass

    def set_label(self, text: str) -> None:
        pass


@contextlib.contextmanager
def spark_progress(spark, description: str, note: str = "", mode: Optional[str] = None,
                   stream: Optional[TextIO] = None, every: Optional[float] = None, poll: float = 0.5,
                   open_ended: bool = False):
    """Show completed/total tasks (and the ETA) of the Spark jobs started inside the block.

    Yields the :class:`SparkProgress` (``n``, ``total``, ``jobs``, ``job_ids``, ``seconds``; final after the block).
    ``note`` is shown after the counts (e.g. ``"2,225 texts"``). ``open_ended=True`` is for a block that starts
    many jobs one after another (a search): completed tasks, jobs and rate, without a percentage or an ETA that
    would only cover the jobs started so far. An exception in the block stops the bar and propagates; the
    polling thread is stopped and joined when the block ends, however it ends. A block nested in another one is
    silent (the outer block counts its jobs), and so is a block in ``off`` mode or without a SparkContext (Spark
    Connect), or where job tags cannot be set: progress never stops the work.
    """
    resolved = mode or progress_mode(stream)
    depth = getattr(_local, "depth", 0)
    sc_ok = True
    try:
        spark.sparkContext  # noqa: B018 - Spark Connect sessions have none
    except Exception:
        sc_ok = False
    if resolved == "off" or depth > 0 or not sc_ok:
        yield _Silent()
        return
    try:
        bar = SparkProgress(spark, description, note=note, poll=poll, mode=resolved, stream=stream, every=every,
                            open_ended=open_ended)
        bar.start()
    except Exception:  # a platform without job tags or py4j access: the work matters, its progress does not
        with contextlib.suppress(Exception):
            bar.stop(failed=True)
        yield _Silent()
        return
    _local.depth = depth + 1
    failed = True
    try:
        yield bar
        failed = False
    finally:
        _local.depth = depth
        bar.stop(failed=failed)
