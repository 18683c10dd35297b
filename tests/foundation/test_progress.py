"""Driver-side progress: task counts of the Spark jobs a block starts (real jobs), modes, and loop progress."""
import io
import re
import threading
import time
from operator import add

import pytest

from tokens2policy.progress import progress, progress_mode, spark_progress


def _progress_threads():
    return [t for t in threading.enumerate() if t.name.startswith("t2p-progress") and t.is_alive()]


def test_counts_are_the_tasks_of_the_jobs_started_in_the_block(spark):
    sc = spark.sparkContext
    sc.parallelize(range(10), 3).count()  # a job before the block is not counted
    pairs = sc.parallelize(range(100), 5).map(lambda x: (x % 3, 1))
    reduced = pairs.reduceByKey(add, 3)
    other = []
    with spark_progress(spark, "test", mode="log", stream=io.StringIO(), every=1e9) as p:
        assert sc.parallelize(range(100), 7).map(lambda x: x).count() == 100  # 1 job, 7 tasks
        assert sorted(reduced.collect()) == [(0, 34), (1, 33), (2, 33)]  # 1 job: 5 map + 3 reduce tasks
        assert len(reduced.collect()) == 3  # 1 job: the map stage is skipped (shuffle reused), 3 tasks
        # a job of another thread during the block is not counted (job tags are thread-local)
        worker = threading.Thread(target=lambda: other.append(sc.parallelize(range(4), 4).count()))
        worker.start()
        worker.join()
    assert other == [4]
    expected = 7 + (pairs.getNumPartitions() + reduced.getNumPartitions()) + reduced.getNumPartitions()
    assert (p.n, p.total, p.jobs) == (expected, expected, 3)
    assert not _progress_threads()
    assert p.tag not in sc.getJobTags()


def test_exception_in_block_propagates_stops_the_bar_and_the_thread(spark):
    out = io.StringIO()
    with pytest.raises(ZeroDivisionError):
        with spark_progress(spark, "failing", mode="log", stream=out, every=1e9, poll=0.05) as p:
            spark.sparkContext.parallelize(range(4), 2).count()
            1 / 0
    assert p.closed and p.failed
    assert not _progress_threads()
    assert p.tag not in spark.sparkContext.getJobTags()
    assert re.fullmatch(r"\[t2p\] failing: \d/2 tasks, 1 job — stopped after \d\d:\d\d\n", out.getvalue())

    # a failing Spark job: its error propagates too
    def boom(_):
        raise ValueError("task failed on purpose")

    with pytest.raises(Exception, match="task failed on purpose"):
        with spark_progress(spark, "job fails", mode="log", stream=io.StringIO(), every=1e9) as q:
            spark.sparkContext.parallelize(range(2), 1).map(boom).collect()
    assert q.failed and not _progress_threads()


def test_log_mode_prints_sparse_count_lines_with_eta(spark, monkeypatch):
    monkeypatch.setenv("T2P_PROGRESS", "auto")
    out = io.StringIO()  # not a terminal: auto -> log lines
    assert progress_mode(out) == "log"
    with spark_progress(spark, "slow job", note="4 things", stream=out, every=0.0, poll=0.05) as p:
        spark.sparkContext.parallelize(range(4), 4).map(lambda x: (time.sleep(0.25), x)[1]).count()
    lines = out.getvalue().splitlines()
    assert p.mode == "log" and (p.n, p.total) == (4, 4)
    assert len(lines) >= 2, lines
    running = re.compile(r"\[t2p\] slow job: (\d)/(\d) tasks \((\d+)%\), 1 job, 4 things — \d\d:\d\d elapsed"
                         r"(, ETA \d\d:\d\d)?")
    waiting = re.compile(r"\[t2p\] slow job: 0 tasks, 0 jobs, 4 things — \d\d:\d\d elapsed")  # before the job starts
    counted = [running.fullmatch(line) for line in lines[:-1] if not waiting.fullmatch(line)]
    assert counted, lines
    for m in counted:
        assert m, lines
        done, total = int(m.group(1)), int(m.group(2))
        assert done <= total == 4 and int(m.group(3)) == round(100 * done / total)
        assert (m.group(4) is not None) == (done > 0)
    assert re.fullmatch(r"\[t2p\] slow job: 4/4 tasks, 1 job, 4 things — done in \d\d:\d\d", lines[-1])


def test_open_ended_block_shows_counts_without_percentage_or_eta(spark):
    out = io.StringIO()
    with spark_progress(spark, "search", mode="log", stream=out, every=0.0, poll=0.05, open_ended=True) as p:
        for parts in (2, 3):  # jobs one after another, as a search starts them
            spark.sparkContext.parallelize(range(parts), parts).map(lambda x: (time.sleep(0.1), x)[1]).count()
    lines = out.getvalue().splitlines()
    assert (p.n, p.total, p.jobs) == (5, 5, 2)
    assert all("%" not in ln and "ETA" not in ln for ln in lines), lines
    running = re.compile(r"\[t2p\] search: \d tasks, \d jobs? — \d\d:\d\d elapsed")
    assert all(running.fullmatch(ln) for ln in lines[:-1]), lines
    assert re.fullmatch(r"\[t2p\] search: 5 tasks, 2 jobs — done in \d\d:\d\d", lines[-1])


def test_modes_off_bar_and_nesting(spark, monkeypatch):
    sc = spark.sparkContext
    monkeypatch.setenv("T2P_PROGRESS", "0")
    out = io.StringIO()
    with spark_progress(spark, "off", stream=out) as p:
        assert not _progress_threads()
        sc.parallelize(range(3), 3).count()
    assert out.getvalue() == "" and p.jobs == 0

    monkeypatch.setenv("T2P_PROGRESS", "bar")  # forced bar even when the stream is not a terminal
    out = io.StringIO()
    with spark_progress(spark, "bar", stream=out) as outer:
        with spark_progress(spark, "inner", stream=out) as inner:  # nested: silent, the outer block counts
            sc.parallelize(range(6), 6).count()
    assert (outer.n, outer.total, inner.jobs) == (6, 6, 0)
    assert "bar: 100%" in out.getvalue() and "6/6" in out.getvalue() and "inner" not in out.getvalue()

    monkeypatch.setenv("T2P_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="T2P_PROGRESS"):
        progress_mode(io.StringIO())


def test_loop_progress_counts_and_closes():
    out = io.StringIO()
    seen = [i for i in progress(range(5), "epochs", unit="epoch", mode="log", stream=out, every=0.0)]
    assert seen == list(range(5))
    lines = out.getvalue().splitlines()
    counts = [re.match(r"\[t2p\] epochs: (\d)/5 epochs \(", ln).group(1) for ln in lines[:-1]]
    assert counts == ["1", "2", "3", "4", "5"]
    assert re.fullmatch(r"\[t2p\] epochs: 5/5 epochs — done in \d\d:\d\d", lines[-1])

    out = io.StringIO()
    with pytest.raises(KeyError):
        for i in progress(range(5), "rounds", mode="log", stream=out, every=1e9):
            if i == 2:
                raise KeyError(i)
    assert re.fullmatch(r"\[t2p\] rounds: 2/5 it — stopped after \d\d:\d\d\n", out.getvalue())

    with progress(total=3, description="manual", mode="off") as p:
        p.update(2)
        assert (p.n, p.total) == (2, 3) and p.eta() is not None


def test_bar_is_drawn_on_a_terminal_that_reports_no_size(monkeypatch):
    import os
    import pty
    import select

    monkeypatch.setenv("T2P_PROGRESS", "auto")
    master, slave = pty.openpty()  # a fresh pty reports 0 x 0, where tqdm alone would draw nothing
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert progress_mode(tty) == "bar"  # a terminal: auto draws a bar
            for _ in progress(range(3), "tiny", mode="bar", stream=tty):
                pass
            tty.flush()
        out = b""
        while select.select([master], [], [], 1.0)[0]:  # everything written so far, however the pty splits it
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
        out = out.decode()
    finally:
        os.close(slave)
        os.close(master)
    assert "tiny: 100%" in out and "3/3" in out, out
