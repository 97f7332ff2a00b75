"""Signals and orphans, for real: `lanpo train` processes killed with SIGKILL, SIGTERM and SIGINT while the update
runs, then resumed; the MLflow run's status read back; no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import pytest

from test_flows import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# A KL term gives every sequence a gradient (the tiny random model earns no reward, so without it the update is
# skipped), and many passes over the rollouts make the update last long enough to be interrupted.
LONG_UPDATE = ["grpo.beta=0.04", "grpo.num_iterations=60", "grpo.micro_batch_size=1"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PREFECT_HOME": str(tmp_path / "prefect")}


def _train(tmp_path: Path, model: str, name: str) -> subprocess.Popen:
    sets = [x for o in tiny_overrides(model, tmp_path / "runs") + LONG_UPDATE for x in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--run-name", name, *sets], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """What `proc` wrote to stderr up to `text` (the progress bar names the running stage)."""
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}: {seen[-2000:]!r}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        chunk = proc.stderr.read()
        seen += chunk or b""
        time.sleep(0.1)
    return seen.decode(errors="replace")


def _descendants(pid: int) -> list[psutil.Process]:
    procs = psutil.Process(pid).children(recursive=True)
    for p in procs:
        p.create_time()  # cached: is_running() then tells a reused pid apart
    return procs


def _alive(procs: list[psutil.Process], within: float = 8.0) -> list[str]:
    """The processes still running after `within` seconds (the watchdogs poll every 0.5 s)."""
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            names = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive]
            for p in alive:  # leave nothing behind, even when the test fails
                p.kill()
            return names
        time.sleep(0.2)


def _signal_during_update(proc: subprocess.Popen, sig: int) -> tuple[list[psutil.Process], float]:
    """Send `sig` to `proc` two seconds into step 1's update; its descendants before the signal, and the seconds it
    took to exit."""
    try:
        _wait_for(proc, "1/2 update-policy")
        time.sleep(2)  # into the update's passes
        assert proc.poll() is None
        procs = _descendants(proc.pid)
        names = [" ".join(p.cmdline()) for p in procs]
        assert any("prefect.server.api.server" in n for n in names), names
        started = time.monotonic()
        os.kill(proc.pid, sig)  # the process alone, as `kill PID` does (not its process group)
        proc.wait(timeout=60)
        return procs, time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _mlflow_run(tmp_path: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.lanpo_run_key LIKE '{name}-%'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _resume(tmp_path: Path, model: str, name: str, first_run_id: str):
    again = _train(tmp_path, model, name)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    assert b"done in" in out and b"2 step(s)" in out
    run = _mlflow_run(tmp_path, name)
    assert run.info.run_id == first_run_id  # the same MLflow run, resumed
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.slow
def test_sigkill_leaves_no_prefect_server_and_the_resume_ends_the_lost_attempt(tmp_path, tiny_model_path):
    victim = _train(tmp_path, tiny_model_path, "sigkill")
    procs, _ = _signal_during_update(victim, signal.SIGKILL)
    left = _alive(procs)
    assert victim.returncode == -signal.SIGKILL
    assert left == []  # the ephemeral Prefect server and the verifier workers died with it
    assert _mlflow_run(tmp_path, "sigkill").info.status == "RUNNING"  # nothing could end it
    run = _resume(tmp_path, tiny_model_path, "sigkill", _mlflow_run(tmp_path, "sigkill").info.run_id)
    assert run.data.tags["lanpo_lost_attempts"] == "1"
    assert f"pid {victim.pid} " in run.data.tags["lanpo_last_lost_attempt"]


@pytest.mark.slow
def test_sigterm_stops_the_update_within_seconds_and_the_run_resumes(tmp_path, tiny_model_path):
    victim = _train(tmp_path, tiny_model_path, "sigterm")
    procs, seconds = _signal_during_update(victim, signal.SIGTERM)
    left = _alive(procs)
    assert victim.returncode == 143, victim.stderr.read()[-2000:]
    assert seconds < 6
    assert left == []
    run = _mlflow_run(tmp_path, "sigterm")
    assert run.info.status == "KILLED"
    resumed = _resume(tmp_path, tiny_model_path, "sigterm", run.info.run_id)
    assert "lanpo_lost_attempts" not in resumed.data.tags  # ended by the signal, not found dead later


@pytest.mark.slow
def test_sigint_stops_the_update_within_seconds(tmp_path, tiny_model_path):
    victim = _train(tmp_path, tiny_model_path, "sigint")
    procs, seconds = _signal_during_update(victim, signal.SIGINT)
    left = _alive(procs)
    assert victim.returncode == 130, victim.stderr.read()[-2000:]
    assert seconds < 6
    assert left == []
    assert b"the same command resumes the run" in victim.stderr.read()
    assert _mlflow_run(tmp_path, "sigint").info.status == "KILLED"


# ------------------------------------------------------------------------------------------- fast, still real
STUCK = """
import subprocess, sys, time
from tasks import processes
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with processes.stop_on_signals(grace=float(sys.argv[1])):
    while True:  # a stage that swallows the interrupt (or is stuck in C code)
        try:
            if child:
                print(child.pid, flush=True)
                child = None
            time.sleep(30)
        except KeyboardInterrupt:
            pass
"""


@pytest.mark.parametrize("second", [False, True])
def test_a_run_that_does_not_unwind_is_forced_out(tmp_path, second):
    proc = subprocess.Popen([sys.executable, "-c", STUCK, "3"], cwd=REPO, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if second:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        seconds = time.monotonic() - started
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert (seconds < 2) if second else (3 <= seconds < 6)
    assert "forcing the exit" in err
    assert _alive([child], within=1) == []


def test_parent_run_ends_failed_on_an_error_and_killed_on_an_interrupt(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from lanpo_core.config import load_config
    from tasks import processes, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
    ids = {}
    for key, error in (("crash", RuntimeError("boom")), ("signal", processes.Interrupted(signal.SIGTERM)),
                       ("ok", None)):
        with pytest.raises(type(error)) if error else nullcontext():
            with tracking.parent_run(cfg, key, key) as run_id:
                ids[key] = run_id
                if error:
                    raise error
    client = MlflowClient(uri)
    assert {k: client.get_run(v).info.status for k, v in ids.items()} == {
        "crash": "FAILED", "signal": "KILLED", "ok": "FINISHED"}
    assert tracking._ACTIVE == {}


def test_a_run_left_running_by_a_dead_process_is_ended_killed_on_resume(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from lanpo_core.config import load_config
    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
    # A real attempt in a real process, killed before it could end its run.
    code = ("import os, sys, time\nfrom lanpo_core.config import load_config\nfrom tasks import tracking\n"
            "cfg = load_config(sys.argv[1])\nwith tracking.parent_run(cfg, 'dead', 'dead') as run_id:\n"
            "    print(run_id, flush=True)\n    time.sleep(60)\n")
    ids = {}
    for key in ("dead", "never-resumed"):  # the second like an evaluation: a run of its own, never resumed
        dead = subprocess.Popen([sys.executable, "-c", code.replace("'dead'", repr(key)),
                                 str(REPO / "configs" / "tiny-cpu.yaml")], cwd=REPO, env=_env(tmp_path),
                                stdout=subprocess.PIPE, text=True)
        ids[key] = dead.stdout.readline().strip()
        dead.kill()
        dead.wait()
    run_id = ids["dead"]
    client = MlflowClient(uri)
    # the second attempt's start ended the first, dead by then; nothing has ended the second yet
    assert {k: client.get_run(i).info.status for k, i in ids.items()} == {"dead": "KILLED", "never-resumed": "RUNNING"}
    seen = []
    with tracking.parent_run(cfg, "dead", "dead") as resumed:
        seen.append(client.get_run(resumed).info.status)
        other = client.get_run(ids["never-resumed"])
        assert (other.info.status, other.data.tags["lanpo_lost_attempts"]) == ("KILLED", "1")
    run = client.get_run(run_id)
    assert resumed == run_id and seen == ["RUNNING"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["lanpo_lost_attempts"] == "1"
    assert run.data.tags["lanpo_pid"] == str(os.getpid())
    # One attempt alive in another process: its run is not touched.
    with tracking.parent_run(cfg, "live", "live") as live_id:
        tracking._end_dead_attempt(live_id)
        assert client.get_run(live_id).info.status == "RUNNING"
        assert "lanpo_lost_attempts" not in client.get_run(live_id).data.tags
