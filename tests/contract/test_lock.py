"""One writing pipeline per lakehouse: the run lock on real Delta, in one process and across two real processes."""
import os
import socket
import subprocess
import sys
import threading
import time
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
