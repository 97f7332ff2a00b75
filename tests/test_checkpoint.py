"""Checkpoints written in the background: snapshot before return, exact resume, checksum from memory equal to the
one read back from disk, failed writes surfacing on `wait_checkpoint`, and no half-written folder ever listed.

Everything runs on the tiny random-weight Llama (`tiny_model_path`) in fp32."""

from __future__ import annotations

import copy
import errno
import gc
import random
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from lanpo_core import checkpoint as ckpt
from lanpo_core.checkpoint import (CheckpointWriteError, DiskFull, latest_checkpoint, list_checkpoints,
                                   tensors_checksum, verify_checkpoint, weights_checksum)
from lanpo_core.config import RunConfig
from lanpo_core.update import PolicyUpdater, RolloutSample

REPO = Path(__file__).resolve().parents[1]
_PRISTINE: dict[str, tuple] = {}


def make_config(lora: bool = False, keep_last: int = 2) -> RunConfig:
    return RunConfig.model_validate({
        "grpo": {"bf16": False, "micro_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "cosine",
                 "warmup_steps": 1, "steps": 4, "checkpoint_keep_last": keep_last},
        "model": {"lora": {"enabled": lora, "r": 4, "alpha": 8}}})


def updater(path: str, run_dir: Path, lora: bool = False, keep_last: int = 2) -> PolicyUpdater:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path not in _PRISTINE:
        _PRISTINE[path] = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           AutoTokenizer.from_pretrained(path))
    model, tok = _PRISTINE[path]
    return PolicyUpdater(make_config(lora, keep_last), copy.deepcopy(model), tok, run_dir)


def batch(seed: int) -> list[RolloutSample]:
    """Two groups of four plain rollouts with mixed rewards (on-policy, so no sampling log-probs are needed)."""
    rng = random.Random(seed)
    out = []
    for g in range(2):
        prompt = [rng.randrange(200, 20000) for _ in range(6)]
        for j in range(4):
            out.append(RolloutSample(group_id=f"p{g}", kind="plain", train_prompt_ids=prompt,
                                     completion_ids=[rng.randrange(200, 20000) for _ in range(rng.randint(3, 7))],
                                     sampling_logprobs=None, reward=float(j % 2 == g % 2), context_conditioned=False))
    return out


def trained_state(up: PolicyUpdater) -> dict:
    """Everything a checkpoint must restore, copied."""
    return {"params": {k: v.detach().clone() for k, v in up.model.named_parameters()},
            "optimizer": copy.deepcopy(up.optimizer.state_dict()), "scheduler": up.lr_scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
            "counters": (up.step_count, up.optimizer_steps, up.trainer.state.global_step)}


def assert_same_state(up: PolicyUpdater, want: dict) -> None:
    got = trained_state(up)
    assert got["params"].keys() == want["params"].keys()
    for k, v in want["params"].items():
        assert torch.equal(got["params"][k], v), k
    go, wo = got["optimizer"], want["optimizer"]
    assert go["param_groups"] == wo["param_groups"]
    assert go["state"].keys() == wo["state"].keys()
    assert len(wo["state"]) > 0
    for i, s in wo["state"].items():
        assert s.keys() == go["state"][i].keys()
        for name, t in s.items():
            assert torch.equal(go["state"][i][name], t), (i, name)
    assert got["scheduler"] == want["scheduler"]
    assert torch.equal(got["torch_rng"], want["torch_rng"])
    assert got["python_rng"] == want["python_rng"]
    assert all(np.array_equal(a, b) for a, b in zip(got["numpy_rng"], want["numpy_rng"]))
    assert got["counters"] == want["counters"]


def gate_writes(monkeypatch, up: PolicyUpdater, where: str = "start") -> threading.Event:
    """Hold this updater's background writes until the returned event is set: before they start (`start`), or with
    every file written but the folder not yet renamed into place (`publish`)."""
    gate = threading.Event()
    if where == "start":
        writer = up._checkpoint_writer
        submit = writer.submit

        def gated_submit(info, job, background):
            return submit(info, lambda: (gate.wait(), job())[1], background)

        monkeypatch.setattr(writer, "submit", gated_submit)
    else:
        fsync_tree = ckpt._fsync_tree

        def gated_fsync(folder):
            gate.wait()
            fsync_tree(folder)

        monkeypatch.setattr(ckpt, "_fsync_tree", gated_fsync)
    return gate


def spy_snapshot(monkeypatch, up: PolicyUpdater) -> list[weakref.ref]:
    """Weak references to one optimiser-moment copy of each checkpoint snapshot (to see it released)."""
    refs = []

    def spy(obj):
        out = PolicyUpdater._copy_state(obj)
        if "state" in out:
            refs.append(weakref.ref(next(iter(out["state"].values()))["exp_avg"]))
        return out

    monkeypatch.setattr(up, "_copy_state", spy)
    return refs


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("lora", [False, True])
def test_background_save_then_load_restores_everything(tiny_model_path, tmp_path, lora, monkeypatch):
    up = updater(tiny_model_path, tmp_path / "run", lora)
    up.step(batch(0))
    up.step(batch(1))
    want = trained_state(up)
    gate = gate_writes(monkeypatch, up)
    snapshot = spy_snapshot(monkeypatch, up)
    info = up.save_checkpoint(background=True)
    assert info.path == tmp_path / "run" / "checkpoints" / "step-000002"
    assert info.step == 2
    assert not info.path.exists()  # nothing on disk before the write has run
    assert up.last_checkpoint is None
    assert snapshot[0]() is not None
    gate.set()
    assert up.wait_checkpoint() == info
    assert up.last_checkpoint == info
    assert up.wait_checkpoint() is None  # nothing pending any more
    gc.collect()
    assert snapshot[0]() is None  # released once the write is done

    torch.manual_seed(99)  # disturb every generator: the checkpoint must restore them
    random.seed(99)
    np.random.seed(99)
    fresh = updater(tiny_model_path, tmp_path / "run", lora)
    assert fresh.load_checkpoint(info.path) == info
    assert_same_state(fresh, want)
    # and it trains on exactly as the original does
    a, b = up.step(batch(2)), fresh.step(batch(2))
    assert a["loss"] == b["loss"]
    assert a["grad_norm"] == b["grad_norm"]
    assert all(torch.equal(p, q) for p, q in zip(up.model.parameters(), fresh.model.parameters()))
    if lora:
        assert (info.path / "adapter_model.safetensors").is_file()
        assert not (info.path / "model.safetensors").exists()
    else:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(info.path)  # still a loadable HF model folder
        assert torch.equal(reloaded.model.embed_tokens.weight, want["params"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("lora", [False, True])
def test_changes_after_return_do_not_reach_the_files(tiny_model_path, tmp_path, lora, monkeypatch):
    up = updater(tiny_model_path, tmp_path / "run", lora)
    up.step(batch(0))
    want = trained_state(up)
    gate = gate_writes(monkeypatch, up)
    info = up.save_checkpoint(background=True)
    # the next update runs while the write has not even started: weights, moments, scheduler, RNG all move on
    up.step(batch(1))
    with torch.no_grad():
        for p in up.model.parameters():
            p.add_(1.0)
    torch.rand(3)
    gate.set()
    up.wait_checkpoint()
    assert verify_checkpoint(info.path).checksum == info.checksum
    fresh = updater(tiny_model_path, tmp_path / "other", lora)
    fresh.load_checkpoint(info.path)
    assert_same_state(fresh, want)


def test_in_memory_checksum_equals_the_files(tiny_model_path, tmp_path):
    up = updater(tiny_model_path, tmp_path / "run")
    up.step(batch(0))
    bg = up.save_checkpoint(background=True)
    up.wait_checkpoint()
    fg = up.save_checkpoint()  # same step, same weights, written in the foreground (replaces the folder)
    assert fg == bg
    assert verify_checkpoint(bg.path).checksum == bg.checksum
    assert weights_checksum(bg.path)[0] == bg.checksum == latest_checkpoint(tmp_path / "run").checksum
    from safetensors.torch import load_file

    assert tensors_checksum(load_file(bg.path / "model.safetensors")) == bg.checksum
    # the tied lm_head is stored once, as the embedding, like save_pretrained does
    assert "lm_head.weight" not in load_file(bg.path / "model.safetensors")
    # independent of the process (it is a cache key) and of how the weights are split into files
    code = ("import sys; from lanpo_core.checkpoint import weights_checksum; "
            "print(weights_checksum(sys.argv[1])[0])")
    out = subprocess.run([sys.executable, "-c", code, str(bg.path)], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == bg.checksum
    from safetensors.torch import save_file

    tensors = load_file(bg.path / "model.safetensors")
    names = sorted(tensors)
    split = tmp_path / "split"
    split.mkdir()
    save_file({k: tensors[k] for k in names[::2]}, split / "a.safetensors")
    save_file({k: tensors[k] for k in names[1::2]}, split / "b.safetensors")
    assert weights_checksum(split)[0] == bg.checksum
    # an update changes it
    up.step(batch(1))
    assert up.save_checkpoint().checksum != bg.checksum


def test_checksum_definition_is_pinned():
    """The checksum names its weights in cache keys: its definition must not drift. Name, dtype, shape and bytes
    all count; dict order does not."""
    t = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
         "c": torch.tensor(7, dtype=torch.int64)}
    value = tensors_checksum(t)
    assert value == "14de35871e2dde9f02f05440342ebbce503bdc82e4039400edc59facd06e4228"
    assert tensors_checksum(dict(reversed(list(t.items())))) == value
    for changed in ({**t, "b": t["b"].reshape(3, 2)}, {**t, "b": t["b"].double()},
                    {**t, "b": t["b"] + 1}, {"B": t["b"], "a": t["a"], "c": t["c"]}):
        assert tensors_checksum(changed) != value
    assert tensors_checksum({"b": t["b"].t().contiguous().t()}) == tensors_checksum({"b": t["b"]})  # strides don't
    with pytest.raises(ValueError, match="complex64"):
        tensors_checksum({"z": torch.zeros(2, dtype=torch.complex64)})


def test_failed_write_surfaces_on_wait_and_publishes_nothing(tiny_model_path, tmp_path, monkeypatch):
    # 1. the checkpoints folder cannot be created (a file is in its place)
    run = tmp_path / "run"
    up = updater(tiny_model_path, run)
    (run / "checkpoints").write_text("not a folder")
    up.step(batch(0))
    info = up.save_checkpoint(background=True)
    with pytest.raises(CheckpointWriteError, match=r"writing checkpoint .*step-000001 failed"):
        up.wait_checkpoint()
    assert up.last_checkpoint is None  # raised once, then cleared
    assert up.wait_checkpoint() is None
    (run / "checkpoints").unlink()

    # 2. the disk fills up half-way through the files (a real full disk: tests/test_damaged_state.py)
    good = up.save_checkpoint()
    up.step(batch(1))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    snapshot = spy_snapshot(monkeypatch, up)
    failing = up.save_checkpoint(background=True)
    for thread in threading.enumerate():
        if thread.name == "checkpoint-step-000002":
            thread.join()
    gc.collect()
    assert snapshot[0]() is None  # released as soon as the write failed, while its error waits to be raised
    with pytest.raises(DiskFull, match=f"the disk holding {run / 'checkpoints'} is full .* while writing "
                                       f"checkpoint {failing.path}") as raised:
        up.wait_checkpoint()
    assert raised.value.errno == errno.ENOSPC
    assert "in the checkpoint write thread" in "".join(raised.value.__notes__)  # the trace is kept
    assert "No space left" in str(raised.value.__cause__)
    assert latest_checkpoint(run) == good == up.last_checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no temporary folder left
    verify_checkpoint(good.path)

    # 3. a failure nobody waited for is raised by the next save, which then goes ahead normally
    up.save_checkpoint(background=True)
    with pytest.raises(DiskFull, match="run the same command again"):
        up.save_checkpoint(background=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert up.save_checkpoint(background=True).step == 2
    assert up.wait_checkpoint().path.is_dir()


def test_listing_never_sees_a_write_in_progress_and_prune_waits(tiny_model_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    up = updater(tiny_model_path, run, keep_last=2)
    up.step(batch(0))
    first = up.save_checkpoint()
    gate = gate_writes(monkeypatch, up, where="publish")
    up.step(batch(1))
    second = up.save_checkpoint(background=True)
    deadline = threading.Event()
    root = run / "checkpoints"
    for _ in range(200):  # until the writer has every file, state.json included, in its temporary folder
        tmp = [p for p in root.iterdir() if p.name.startswith(".tmp-step-000002")]
        if tmp and (tmp[0] / "state.json").is_file():
            break
        deadline.wait(0.05)
    assert tmp
    assert (tmp[0] / "state.json").is_file()
    assert list_checkpoints(run) == [first]
    assert latest_checkpoint(run) == first
    gate.set()
    # the next save waits for the pending one; with keep_last=2 pruning then removes only the oldest, after it
    up.step(batch(2))
    third = up.save_checkpoint(background=True)
    assert up.last_checkpoint == second
    assert up.wait_checkpoint() == third
    assert [c.step for c in list_checkpoints(run)] == [2, 3]
    assert not first.path.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]
    assert [verify_checkpoint(c.path).checksum for c in (second, third)] == [second.checksum, third.checksum]


@pytest.mark.slow
def test_benchmark_runs_and_reports(tiny_model_path, tmp_path):
    import json

    out = tmp_path / "checkpoint.json"
    done = subprocess.run([sys.executable, "bench/checkpoint.py", "--model", tiny_model_path, "--repeats", "1",
                           "--batch", "1", "--tokens", "8", "--run-dir", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    med = result["median"]
    assert 0 < med["background: caller blocked"] <= med["background: until on disk"]
    assert med["overlap: forward passes during the write"] >= 1
    assert "overlap: forward slowdown" in med
    assert result["cpu"] in result["header"]
    assert "| foreground save_checkpoint() |" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]  # its run folder is removed


def test_format_1_checkpoints_still_verify(tmp_path):
    """Checkpoints written before the tensor checksum recorded sha256 over the weight files' bytes."""
    import hashlib
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(4, dtype=torch.float32)}, folder / "model.safetensors")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    checksum = hashlib.sha256(f"model.safetensors {digest}\n".encode()).hexdigest()
    (folder / "state.json").write_text(json.dumps({"format": 1, "step": 1, "checksum": checksum}))
    assert verify_checkpoint(folder).checksum == checksum
    save_file({"w": torch.arange(1, 5, dtype=torch.float32)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="checksum"):
        verify_checkpoint(folder)
