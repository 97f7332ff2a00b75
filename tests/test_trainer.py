"""The long-lived trainer (lanpo_core/trainer.py): 2 `accelerate launch` ranks on 127.0.0.1 (gloo), real processes.

The 2-rank trainer's checkpoints equal the 1-process update's on the same steps and micro-batches (float tolerance);
a trainer killed with SIGKILL fails the flow's wait with a message naming it, and a restarted one resumes from the
checkpoint to the bit-identical weights of an uninterrupted one; every process a test starts is gone at its end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from lanpo_core.checkpoint import read_state, verify_checkpoint
from lanpo_core.config import ConfigError, RunConfig, load_config
from lanpo_core.runtime import PolicyRef
from lanpo_core.trainer import HEARTBEAT, TrainerUnavailable, hand_off, read_json, request_path, response_path
from lanpo_core.update import RolloutSample

REPO = Path(__file__).resolve().parents[1]
LANPO = str(Path(sys.executable).parent / "lanpo")


def _config(model_path: str, channel: Path, **trainer) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name_or_path": model_path},
        "rollout": {"max_new_tokens": 16, "temperature": 1.0},
        "grpo": {"steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "bf16": False},
        "update": {"placement": "trainer", "trainer": {"channel": str(channel), "poll_seconds": 0.1,
                                                        "timeout_seconds": 600, "liveness_seconds": 120, **trainer}},
    })


def _samples(seed: int) -> list[RolloutSample]:
    """10 rollouts in 3 groups, all with signal: 5 micro-batches of 2, so the second rank runs an empty one in the
    last round; two reflection rollouts are off-policy (weighted by their sampling log-probs)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 2000, (n,), generator=g).tolist()

    def sample(group: str, kind: str, reward: float, prompt: int, completion: int) -> RolloutSample:
        context = kind != "plain"
        logps = (-torch.rand(completion, generator=g) * 3).tolist() if context else None
        return RolloutSample(group, kind, ids(prompt), ids(completion), logps, reward, context)

    return [sample("a", "plain", 1.0, 12, 9), sample("a", "plain", 0.0, 12, 14), sample("a", "plain", 1.0, 12, 5),
            sample("a", "plain", 0.0, 12, 11), sample("b", "plain", 1.0, 9, 7), sample("b", "plain", 0.0, 9, 16),
            sample("b", "reflection", 1.0, 9, 8), sample("b", "reflection", 1.0, 9, 12),
            sample("c", "plain", 0.0, 15, 6), sample("c", "plain", 1.0, 15, 10)]


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_trainer(channel: Path, log: Path) -> subprocess.Popen:
    """`lanpo trainer` with the shipped 2-rank CPU config (gloo)."""
    cmd = [LANPO, "trainer", "--channel", str(channel), "--poll-seconds", "0.1", "--config_file",
           str(REPO / "configs" / "accelerate" / "ddp-cpu.yaml"), "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and its descendants (torchrun starts each rank in a session of its own)."""
    try:
        launcher = psutil.Process(proc.pid)
        return [launcher] + launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _ranks_started(proc: subprocess.Popen, timeout: float = 60) -> list[psutil.Process]:
    """The launcher and its descendants once both ranks are running."""
    deadline = time.monotonic() + timeout
    while len(_processes(proc)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    return _processes(proc)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill(proc: subprocess.Popen, procs: list[psutil.Process] | None = None) -> None:
    """SIGKILL the launcher and every rank, by pid; assert that none is left."""
    procs = procs if procs is not None else _processes(proc)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)
    assert _running(procs) == []


def _wait_exit(proc: subprocess.Popen, procs: list[psutil.Process], log: Path, timeout: float = 120) -> None:
    """The trainer exits by itself (status 0), its ranks (`procs`, taken while it ran) with it."""
    assert len(procs) >= 3  # the launcher and two ranks
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
        psutil.wait_procs(procs, timeout=30)
        assert _running(procs) == []
    finally:
        _kill(proc, procs)


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory):
    """The 1-process update (PolicyUpdater in this process) on two steps: checkpoints and metrics."""
    from lanpo_core.models import load_policy
    from lanpo_core.update import PolicyUpdater

    run_dir = tmp_path_factory.mktemp("reference")
    cfg = _config(tiny_model_path, run_dir / "unused")
    model, tokenizer = load_policy(tiny_model_path, dtype="float32")
    updater = PolicyUpdater(cfg, model, tokenizer, run_dir)
    out = []
    for seed in (1, 2):
        metrics = updater.step(_samples(seed))
        out.append((updater.save_checkpoint(), metrics))
    return out


def test_trainer_needs_a_channel():
    with pytest.raises(ValueError, match="update.trainer.channel"):
        RunConfig.model_validate({"update": {"placement": "trainer"}})
    assert load_config(REPO / "configs" / "tiny-cpu.yaml").update.placement == "in_process"
    with pytest.raises(ConfigError, match="placement"):
        load_config(REPO / "configs" / "tiny-cpu.yaml", ["update.placement=remote"])


def test_no_trainer_fails_within_liveness(tiny_model_path, tmp_path):
    cfg = _config(tiny_model_path, tmp_path / "channel", liveness_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(TrainerUnavailable) as e:
        hand_off(cfg, tmp_path / "run", PolicyRef.base(cfg), _samples(1))
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert "no heartbeat" in message and str(response_path(tmp_path / "channel", 1)) in message
    assert "lanpo trainer --channel" in message
    assert read_json(request_path(tmp_path / "channel", 1))["step"] == 1  # the request stays for a trainer to answer


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_exactly(tiny_model_path, reference, tmp_path):
    # --- an uninterrupted 2-rank trainer, two steps: the 1-process weights to float tolerance
    channel, run = tmp_path / "channel-a", tmp_path / "run-a"
    cfg = _config(tiny_model_path, channel)
    proc = _start_trainer(channel, tmp_path / "trainer-a.log")
    try:
        policy, answers, procs = PolicyRef.base(cfg), [], _ranks_started(proc)
        for seed in (1, 2):
            policy, metrics = hand_off(cfg, run, policy, _samples(seed))
            answers.append((policy, metrics))
        heartbeat = read_json(channel / HEARTBEAT)
        assert len(heartbeat["ranks"]) == 2 and heartbeat["step"] == 2
        assert {r["pid"] for r in heartbeat["ranks"]} <= {p.pid for p in procs}
        _wait_exit(proc, procs, tmp_path / "trainer-a.log")  # it exits after the run's last step
    finally:
        _kill(proc)
    base = _weights(reference[0][0].path)  # only for the size of a step's change
    for (ref_info, ref_metrics), (policy, metrics) in zip(reference, answers):
        assert verify_checkpoint(policy.path).checksum == policy.checksum
        ref_state, state = read_state(ref_info.path), read_state(policy.path)
        assert state["config_digest"] == cfg.digest()
        own = ("created", "checksum", "weight_files", "config_digest")  # the reference's channel differs
        assert {k: v for k, v in state.items() if k not in own} == {k: v for k, v in ref_state.items() if k not in own}
        expected, got = _weights(ref_info.path), _weights(policy.path)
        assert expected.keys() == got.keys()
        worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
        assert worst < 1e-5, worst
        for key in ("loss", "grad_norm", "kind/reflection/weight_mean", "kind/plain/weight_mass", "entropy",
                    "samples/trained", "is/n"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
    moved = max(float((_weights(reference[1][0].path)[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4  # the second step changed the weights by far more than the tolerance
    assert answers[0][1]["samples/trained"] == 10 and answers[0][1]["is/n"] == 2

    # --- another run: step 1, SIGKILL, the flow's wait fails naming the trainer, a new trainer resumes exactly
    channel, run = tmp_path / "channel-b", tmp_path / "run-b"
    cfg = _config(tiny_model_path, channel)
    proc = _start_trainer(channel, tmp_path / "trainer-b.log")
    try:
        first, _ = hand_off(cfg, run, PolicyRef.base(cfg), _samples(1))
        assert first.checksum == answers[0][0].checksum
    finally:
        _kill(proc)
    with pytest.raises(TrainerUnavailable) as e:  # a trainer starting up gets liveness_seconds: 2 s here
        hand_off(_config(tiny_model_path, channel, liveness_seconds=2), run, first, _samples(2))
    message = str(e.value)
    assert "is gone" in message and str(response_path(channel, 2)) in message and "2 rank(s)" in message
    proc = _start_trainer(channel, tmp_path / "trainer-c.log")
    try:
        procs = _ranks_started(proc)
        second, _ = hand_off(cfg, run, first, _samples(2))
        _wait_exit(proc, procs, tmp_path / "trainer-c.log")
    finally:
        _kill(proc)
    assert "resumed at step 1" in (tmp_path / "trainer-c.log").read_text()
    assert second.checksum == answers[1][0].checksum  # bit-identical to the uninterrupted trainer
