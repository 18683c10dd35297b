"""One writing pipeline per lakehouse: the run lock on real Delta, in one process and across two real processes."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokens2policy.lakehouse import read_table
from tokens2policy.lakehouse.lock import LockHeldError, RunLock

TOY = Path(__file__).resolve().parent / "toy_pipeline.py"


def test_a_held_lock_refuses_a_second_taker_with_one_line_naming_the_holder(spark, make_cfg):
    cfg = make_cfg()
    first = RunLock(spark, cfg, command="t2p run all", lease_seconds=60).acquire()
    try:
        second = RunLock(spark, cfg, wait_seconds=0, lease_seconds=60)
        with pytest.raises(LockHeldError) as info:
            second.acquire()
        msg = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()} (t2p run all)" in msg and "\n" not in msg
        assert second.live_holder().owner == first.owner
        # a taker that waits gets it once the holder is done
        waiter = RunLock(spark, cfg, wait_seconds=120, lease_seconds=60, echo=lambda m: None)
        threading.Timer(2.0, first.release).start()
        started = time.time()
        waiter.acquire()
        assert time.time() - started >= 1.5 and waiter.holder().owner == waiter.owner
        waiter.release()
    finally:
        first.release()
    assert RunLock(spark, cfg).holder() is None, "released: the row is gone"


def test_a_creator_that_finds_the_table_made_meanwhile_writes_no_second_lease(spark, make_cfg, monkeypatch):
    """The lock table is created holding its first taker's lease. A second creator that saw no table, then writes
    after the first one committed, must be refused by Delta (errorifexists) and take the normal path — an
    appended second lease row would leave only the hosts' clocks to decide who holds the lock."""
    import tokens2policy.lakehouse.tables as tables

    cfg = make_cfg()
    first = RunLock(spark, cfg, command="first", lease_seconds=60).acquire()
    try:
        assert [r.owner for r in first._rows()] == [first.owner]
        real_exists, calls = tables.table_exists, []

        def not_yet_once(spark_, config, name):  # the second creator looked just before the first one committed
            calls.append(name)
            return False if len(calls) == 1 else real_exists(spark_, config, name)

        second = RunLock(spark, cfg, command="second", wait_seconds=0, lease_seconds=60)
        monkeypatch.setattr(tables, "table_exists", not_yet_once)
        with pytest.raises(LockHeldError, match=r"\(first\)"):
            second._ensure_table()
            second.acquire()
        monkeypatch.setattr(tables, "table_exists", real_exists)
        assert len(calls) >= 2, "the refused write was retried as a conflict, not raised"
        assert read_table(spark, cfg, "run_lock").count() == 1
        assert [r.owner for r in second._rows()] == [first.owner]
    finally:
        first.release()


def test_stale_leases_are_taken_over(spark, make_cfg):
    cfg = make_cfg()
    # a holder that stopped renewing (hung, cut off): its lease expires
    hung = RunLock(spark, cfg, lease_seconds=4).acquire()
    hung._stop.set()
    hung._thread.join()
    taker = RunLock(spark, cfg, wait_seconds=60, lease_seconds=60, echo=lambda m: None)
    taker.acquire()
    assert taker.holder().owner == taker.owner
    assert hung.renew() is False and hung.lost, "the old holder finds out at its next renewal"
    with pytest.raises(Exception, match="lost the run lock"):
        hung.check()
    taker.release()

    # a holder whose process is gone (killed): taken over at once, not after the lease
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ghost = RunLock(spark, cfg, lease_seconds=3600)
    ghost.pid = gone.pid
    ghost.acquire()
    ghost._stop.set()
    started = time.time()
    taker = RunLock(spark, cfg, wait_seconds=0, lease_seconds=60).acquire()
    assert taker.holder().owner == taker.owner and time.time() - started < 60
    taker.release()


def test_racing_takers_one_wins_the_others_name_it(spark, make_cfg):
    """Real concurrent Delta commits (threads of this process, one JVM; the process race is the slow test below):
    takers released at once on a lakehouse with no lock table yet, then on a free lock row — exactly one holds."""
    cfg = make_cfg()
    for round_ in range(2):
        takers = [RunLock(spark, cfg, command=f"taker {i}", wait_seconds=0, lease_seconds=60, echo=lambda m: None)
                  for i in range(3)]
        barrier = threading.Barrier(len(takers))
        outcome = {}

        def take(lock):
            barrier.wait()
            try:
                lock.acquire()
                outcome[lock.command] = "held"
            except LockHeldError as exc:
                outcome[lock.command] = str(exc)

        threads = [threading.Thread(target=take, args=(t,)) for t in takers]
        [t.start() for t in threads]
        [t.join(timeout=600) for t in threads]
        winners = [t for t in takers if outcome[t.command] == "held"]
        assert len(winners) == 1, (round_, outcome)
        for t in takers:
            if t is not winners[0]:
                assert f"({winners[0].command})" in outcome[t.command] and "\n" not in outcome[t.command]
        assert [lease.owner for lease in RunLock(spark, cfg)._rows()] == [winners[0].owner]
        winners[0].release()
        assert RunLock(spark, cfg).holder() is None


def test_break_lock_takes_over_a_live_holder_which_then_stops(spark, make_cfg):
    cfg = make_cfg("runner.break_lock=true")
    stuck = RunLock(spark, cfg, command="stuck", lease_seconds=3600, break_lock=False).acquire()
    stuck._stop.set()
    stuck._thread.join()
    with pytest.raises(LockHeldError, match="runner.break_lock=true"):
        RunLock(spark, cfg, wait_seconds=0, break_lock=False).acquire()
    lines = []
    breaker = RunLock(spark, cfg, wait_seconds=0, lease_seconds=60, echo=lines.append).acquire()
    assert breaker.holder().owner == breaker.owner
    assert any("breaking (runner.break_lock=true) run lock of pid" in m and "(stuck)" in m for m in lines), lines
    assert stuck.renew() is False and stuck.lost, "the broken holder finds out at its next renewal"
    breaker.release()


def _toy(data_dir, *args, env=None):
    return subprocess.Popen([sys.executable, str(TOY), str(data_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow  # two Spark processes (~1 min idle)
def test_a_second_pipeline_process_exits_naming_the_holder_or_waits_for_it(spark, make_cfg):
    cfg = make_cfg()
    holder = RunLock(spark, cfg, command="t2p run all", lease_seconds=60).acquire()
    try:
        refused = _toy(cfg.data_path, "--set", "runner.lock_wait_seconds=0")
        out, err = refused.communicate(timeout=900)
        assert refused.returncode == 2, (out, err)
        line = [x for x in err.splitlines() if x.startswith("t2p: error:")]
        assert len(line) == 1 and f"pid {os.getpid()} on {socket.gethostname()} (t2p run all)" in line[0], err
        assert "[t2p] stage 1/2 a: running" not in out

        waiting = _toy(cfg.data_path, "--set", "runner.lock_wait_seconds=900")
        for text in iter(waiting.stdout.readline, ""):
            if text.startswith("[t2p] waiting for the run lock"):
                break
        released = time.time()
        holder.release()
        out, err = waiting.communicate(timeout=900)
        assert waiting.returncode == 0, (out, err)
    finally:
        holder.release()
    runs = read_table(spark, cfg, "stage_runs").collect()
    assert sorted(r.stage for r in runs if r.status == "success") == ["a", "b"]
    assert min(r.finished_at.timestamp() for r in runs) > released


def _wait_for(proc, prefix):
    for text in iter(proc.stdout.readline, ""):
        if text.startswith(prefix):
            return text
    raise AssertionError(f"{prefix!r} never printed: {proc.communicate()}")


@pytest.mark.slow  # three Spark processes (~1-2 min under load)
def test_two_runner_processes_race_one_wins_and_a_killed_holder_is_taken_over(spark, make_cfg, tmp_path):
    """Two `t2p`-like runner processes released at the same instant on a fresh lakehouse (the lock table does not
    exist yet): one runs the pipeline, the other exits 2 with one line naming the winner's pid. Then a holder is
    SIGKILLed mid-stage; the next runner takes its stale lease over at once and the stage reruns."""
    cfg = make_cfg()
    go = tmp_path / "go"
    env = {"TOY_GO_FILE": str(go), "TOY_B_SECONDS": "10"}
    racers = [_toy(cfg.data_path, "--set", "runner.lock_wait_seconds=0", env=env) for _ in range(2)]
    for r in racers:
        _wait_for(r, "[toy] pid")
    go.touch()
    with ThreadPoolExecutor(2) as pool:  # drain both pipes at once
        outputs = list(pool.map(lambda r: r.communicate(timeout=900), racers))
    done = {r.pid: (r.returncode, *o) for r, o in zip(racers, outputs)}
    codes = sorted(rc for rc, _, _ in done.values())
    assert codes == [0, 2], done
    winner = next(pid for pid, (rc, _, _) in done.items() if rc == 0)
    loser_err = next(err for rc, _, err in done.values() if rc == 2)
    line = [x for x in loser_err.splitlines() if x.startswith("t2p: error:")]
    assert len(line) == 1 and f"pid {winner} on {socket.gethostname()} (t2p run a b)" in line[0], loser_err
    runs = read_table(spark, cfg, "stage_runs").collect()
    assert sorted((r.stage, r.status) for r in runs) == [("a", "success"), ("b", "success")], "the loser wrote nothing"
    assert RunLock(spark, cfg).holder() is None

    killed = _toy(cfg.data_path, "--force", "b", env={"TOY_B_SECONDS": "600"})
    _wait_for(killed, "[t2p] stage 2/2 b: running")
    assert RunLock(spark, cfg).holder().pid == killed.pid
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    # lock_wait_seconds=0: the dead holder's lease (300 s by default, renewed until the kill) is taken over at once, not after
    taker = _toy(cfg.data_path, "--force", "b", "--set", "runner.lock_wait_seconds=0")
    out, err = taker.communicate(timeout=900)
    assert taker.returncode == 0, (out, err)
    assert f"[t2p] taking over the stale run lock of pid {killed.pid} on {socket.gethostname()}" in out, out
    runs = read_table(spark, cfg, "stage_runs").collect()
    assert sorted(r.stage for r in runs if r.status == "success") == ["a", "b", "b"]
    assert RunLock(spark, cfg).holder() is None
