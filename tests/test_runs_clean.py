"""Run lifecycle: SIGTERM as an interrupt, and `metarec runs clean` ending the runs whose
process died (:mod:`metarec_runner.tracking.lifecycle`, :mod:`metarec_runner.tracking.stale_runs`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from metarec_runner.tracking import MlflowTracker
from metarec_runner.tracking.lifecycle import (
    HEARTBEAT_TAG,
    HOST_TAG,
    PID_TAG,
    Terminated,
    raise_if_terminated,
    terminate_as_interrupt,
)
from metarec_runner.tracking.sqlite_store import TrackingStoreError
from metarec_runner.tracking.stale_runs import REASON_TAG, clean_runs, pid_alive, stale_reason
from tests.helpers import METAREC, metarec_env

HOST = socket.gethostname()
NOW = 2_000_000_000.0  # a fixed "now" for the pure checks (unix seconds)
SIGNAL_WAIT_S = 30  # the most a test waits for a signal or a child process to arrive


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- SIGTERM as an interrupt


def _wait_for_signal() -> None:
    """Sleep in short steps: the signal handler raises in between (or the test fails after a while)."""
    for _ in range(SIGNAL_WAIT_S * 100):
        time.sleep(0.01)


def test_sigterm_raises_terminated_and_the_handler_is_restored() -> None:
    seen = []

    def previous(signum, frame) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Terminated, match="SIGTERM") as info:
            with terminate_as_interrupt():
                assert signal.getsignal(signal.SIGTERM) is not previous
                os.kill(os.getpid(), signal.SIGTERM)
                _wait_for_signal()
        assert isinstance(info.value, KeyboardInterrupt)  # handled wherever Ctrl+C is
        assert signal.getsignal(signal.SIGTERM) is previous
        assert seen == []
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_sigterm_whose_raise_was_swallowed_still_ends_the_run() -> None:
    """A SIGTERM handled while Python runs a finalizer: its Terminated is printed and dropped
    there, so the training loop's raise_if_terminated (after every step) raises it instead."""
    class Finalizer:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_signal()  # the handler raises here, inside __del__: Python drops it

    raise_if_terminated()  # nothing received: nothing raised
    with pytest.raises(Terminated, match="SIGTERM"):
        with terminate_as_interrupt():
            finalizer = Finalizer()
            del finalizer  # the signal's own raise is swallowed
            raise_if_terminated()
    raise_if_terminated()  # acted on once; a new block starts clean


def test_a_second_sigterm_while_ending_the_run_is_ignored() -> None:
    ended = []
    old = signal.getsignal(signal.SIGTERM)
    with terminate_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_signal()
        except Terminated:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. SLURM signalling again: cleanup goes on
            time.sleep(0.05)
            ended.append("KILLED")
    assert ended == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) == old


def test_terminate_as_interrupt_outside_the_main_thread_changes_nothing() -> None:
    outcome = []

    def work() -> None:
        with terminate_as_interrupt():
            outcome.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome == [before]


# ---------------------------------------------------------------- which runs are stale


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-5)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_a_zombie_counts_as_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{proc.pid}/stat")
    try:
        for _ in range(SIGNAL_WAIT_S * 100):  # exited, not yet reaped by us
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not pid_alive(proc.pid)
    finally:
        proc.wait()


def test_stale_reason_this_host_follows_the_pid() -> None:
    old_beat = {PID_TAG: str(os.getpid()), HOST_TAG: HOST, HEARTBEAT_TAG: str(NOW - 10**6)}
    assert stale_reason(old_beat, 0, NOW, HOST, 600) is None  # alive: kept, however old its beat
    dead = {PID_TAG: str(_dead_pid()), HOST_TAG: HOST, HEARTBEAT_TAG: str(NOW - 5)}
    reason, end_ms = stale_reason(dead, 0, NOW, HOST, 600)
    assert reason == f"process {dead[PID_TAG]} on {HOST} is gone"
    assert end_ms == int((NOW - 5) * 1000)  # the last sign of life


def test_stale_reason_other_hosts_follow_the_heartbeat() -> None:
    fresh = {PID_TAG: "1", HOST_TAG: "elsewhere", HEARTBEAT_TAG: str(NOW - 599)}
    assert stale_reason(fresh, 0, NOW, HOST, 600) is None
    old = {**fresh, HEARTBEAT_TAG: str(NOW - 601)}
    assert stale_reason(old, 0, NOW, HOST, 600) == ("no heartbeat for 601 s (on elsewhere)",
                                                   int((NOW - 601) * 1000))
    start_ms = int((NOW - 700) * 1000)
    assert stale_reason({}, start_ms, NOW, HOST, 600) == (
        "no heartbeat, started 700 s ago (from an unknown host)", int(NOW * 1000))
    assert stale_reason({}, start_ms, NOW, HOST, 800) is None
    garbage = {PID_TAG: "x", HOST_TAG: HOST, HEARTBEAT_TAG: "soon"}
    assert stale_reason(garbage, start_ms, NOW, HOST, 600)[0].startswith("no heartbeat, started 700 s")


def test_clean_runs_ends_only_the_stale_ones(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "clean")
    alive = tracker.start({})  # this process: alive
    client = MlflowClient(uri)
    exp = tracker.experiment_id
    now = time.time()
    made = {
        "dead": {PID_TAG: str(_dead_pid()), HOST_TAG: HOST, HEARTBEAT_TAG: f"{now - 3:.3f}"},
        "far_old": {PID_TAG: "1", HOST_TAG: "elsewhere", HEARTBEAT_TAG: f"{now - 3600:.3f}"},
        "far_fresh": {PID_TAG: "1", HOST_TAG: "elsewhere", HEARTBEAT_TAG: f"{now + 3600:.3f}"},
        "untagged": {},
    }
    ids = {name: client.create_run(exp, start_time=int((now - 7200) * 1000), tags=tags,
                                   run_name=name).info.run_id for name, tags in made.items()}
    done = client.create_run(exp, tags={PID_TAG: "1", HOST_TAG: "elsewhere"}).info.run_id
    client.set_terminated(done, "FINISHED")

    would, running = clean_runs(uri, stale_after=600, dry_run=True)
    assert running == 5 and sorted(r.run_name for r in would) == ["dead", "far_old", "untagged"]
    assert all(client.get_run(i).info.status == "RUNNING" for i in ids.values())  # dry run

    cleaned, running = clean_runs(uri, stale_after=600)
    assert running == 5
    assert {r.run_id for r in cleaned} == {ids["dead"], ids["far_old"], ids["untagged"]}
    assert all(r.experiment == "clean" for r in cleaned)
    for name in ("dead", "far_old", "untagged"):
        run = client.get_run(ids[name])
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags[REASON_TAG] == next(r.reason for r in cleaned if r.run_name == name)
    assert client.get_run(ids["dead"]).info.end_time == int(float(made["dead"][HEARTBEAT_TAG]) * 1000)
    for run_id in (alive, ids["far_fresh"]):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(done).info.status == "FINISHED" and REASON_TAG not in client.get_run(done).data.tags
    assert clean_runs(uri, stale_after=600) == ([], 2)  # nothing left to end
    tracker.finish()


def test_clean_runs_refuses_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(TrackingStoreError, match="no MLflow store at"):
        clean_runs(f"sqlite:///{tmp_path}/none.db")
    assert not (tmp_path / "none.db").exists()  # not created on the way
    (tmp_path / "empty.db").touch()
    (tmp_path / "text.db").write_text("not a database")
    for name in ("empty.db", "text.db"):
        with pytest.raises(TrackingStoreError, match=f"{name} is not an MLflow store"):
            clean_runs(f"sqlite:///{tmp_path}/{name}")
    assert (tmp_path / "empty.db").stat().st_size == 0  # left as it was


# ---------------------------------------------------------------- end to end: a killed process

OPENER = textwrap.dedent("""
    import sys, time
    from metarec_runner.tracking import MlflowTracker
    tracker = MlflowTracker(sys.argv[1], "victims", run_name="victim")
    print(tracker.start({"a": 1}), flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_runs_clean_ends_a_sigkilled_run_and_keeps_a_live_one(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", OPENER, uri], stdout=subprocess.PIPE, text=True,
                            env=metarec_env(tmp_path / "out"))
    try:
        victim = proc.stdout.readline().strip()  # the run is open
    finally:
        proc.kill()  # SIGKILL: no handler, no finish()
        proc.wait()
    assert victim, "the child did not open its run"
    client = MlflowClient(uri)
    assert client.get_run(victim).info.status == "RUNNING"
    live = MlflowTracker(uri, "victims", run_name="live")
    live_id = live.start({})  # this process: alive

    res = subprocess.run([*METAREC, "runs", "clean", "--tracking-uri", uri], capture_output=True,
                         text=True, timeout=300, env=metarec_env(tmp_path / "out"), check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines == [f"KILLED {victim} victims/victim: process {proc.pid} on {HOST} is gone",
                     f"1 of 2 RUNNING run(s) ended KILLED in {uri}"]
    run = client.get_run(victim)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.info.end_time >= run.info.start_time
    assert client.get_run(live_id).info.status == "RUNNING"
    live.finish()
    assert client.get_run(live_id).info.status == "FINISHED"


@pytest.mark.slow
def test_runs_clean_on_a_missing_store_says_so_in_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/nowhere/mlflow.db"
    res = subprocess.run([*METAREC, "runs", "clean", "--tracking-uri", uri], capture_output=True,
                         text=True, timeout=300, env=metarec_env(tmp_path / "out"), check=False)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"metarec: error: no MLflow store at {tmp_path}/nowhere/mlflow.db; pass --tracking-uri "
        "with an existing store"]
    assert not (tmp_path / "nowhere").exists()
