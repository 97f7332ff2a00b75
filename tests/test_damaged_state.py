"""A damaged checkpoint is refused before use, wherever it is loaded, with one line saying which, what differs and
what to do; a full disk under the run folder is one line naming it, leaves no half checkpoint, and the run resumes to
the same weights once space is freed. The full disk is a real tmpfs (mounting it needs root; skipped otherwise)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lanpo_core import checkpoint as ckpt
from lanpo_core.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

from test_checkpoint import batch, trained_state, assert_same_state, updater

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers
def damage(folder: Path, how: str) -> None:
    """Truncate `model.safetensors`, flip bytes in its tensor data or in its header, or damage the optimiser file."""
    weights = folder / "model.safetensors"
    if how == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif how == "flipped":
        data = bytearray(weights.read_bytes())
        for i in range(len(data) - 4000, len(data) - 3000):  # inside the last tensor: the file still parses
            data[i] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "header":
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "optimizer":
        path = folder / "optimizer.pt"
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    else:
        raise AssertionError(how)


def two_checkpoints(model_path: str, run: Path):
    up = updater(model_path, run)
    infos = []
    for seed in (0, 1):
        up.step(batch(seed))
        infos.append(up.save_checkpoint())
    return up, infos


def one_line_error(text: str, *needles: str) -> str:
    """The single `error:` line of a command's stderr, which must contain every needle; no trace anywhere."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("how, found", [("truncated", "(truncated)"), ("flipped", "weight checksum expected"),
                                        ("header", "model.safetensors")])
def test_damaged_weights_are_refused_by_every_loader(tiny_model_path, tmp_path, how, found):
    from lanpo_core.models import load_policy, resolve_policy

    run = tmp_path / "run"
    up, (first, second) = two_checkpoints(tiny_model_path, run)
    damage(second.path, how)
    before = trained_state(up)

    with pytest.raises(ValueError) as raised:
        verify_checkpoint(second.path)
    assert type(raised.value).__name__ == "CheckpointDamaged"
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {second.path} (step 2) is damaged: ")
    assert found in message
    assert f"resume from the previous checkpoint {first.path} (step 1)" in message
    if how == "truncated":  # what was expected and what was found, in bytes
        size = os.path.getsize(second.path / "model.safetensors")
        assert f"model.safetensors: {size} bytes, its header describes " in message
    if how == "flipped":
        assert f"expected {second.checksum[:12]}, found " in message

    # the same error from each way a checkpoint's weights are loaded: resume, a model spec (transformers, eval), and
    # the path handed to vLLM
    for load in (lambda: up.load_checkpoint(second.path), lambda: load_policy(str(second.path)),
                 lambda: resolve_policy(str(second.path))):
        with pytest.raises(ValueError) as again:
            load()
        assert str(again.value) == message
    assert_same_state(up, before)  # nothing was restored from it

    # the advice holds: without the damaged folder, the previous checkpoint loads
    shutil.rmtree(second.path)
    assert up.load_checkpoint(latest_checkpoint(run).path) == first
    assert resolve_policy(str(first.path)).kind == "local"


def test_damaged_optimizer_state_is_refused_before_anything_is_restored(tiny_model_path, tmp_path):
    up, (first, second) = two_checkpoints(tiny_model_path, tmp_path / "run")
    damage(second.path, "optimizer")
    before = trained_state(up)
    with pytest.raises(ValueError, match=r"step 2\) is damaged: optimizer.pt is unreadable \(RuntimeError") as raised:
        up.load_checkpoint(second.path)
    assert type(raised.value).__name__ == "CheckpointDamaged"
    assert f"previous checkpoint {first.path}" in str(raised.value)
    assert_same_state(up, before)


def test_only_checkpoint_damaged_says_the_updates_repeat(tiny_model_path, tmp_path):
    up = updater(tiny_model_path, tmp_path / "run")
    up.step(batch(0))
    info = up.save_checkpoint()
    (info.path / "state.json").write_text('{"step": 1, "checks')
    with pytest.raises(ValueError, match=r"state.json is unreadable .*no earlier checkpoint is left: delete that "
                                         r"folder and run the same `lanpo train` command again, which repeats"):
        verify_checkpoint(info.path)
    copied = tmp_path / "copied"
    shutil.copytree(info.path, copied)  # outside a run: nothing to resume from
    (copied / "state.json").write_text(json.dumps({"step": 1, "checksum": "0" * 64, "format": 2}))
    with pytest.raises(ValueError, match=r"weight checksum expected 000000000000, found .* replace that folder"):
        verify_checkpoint(copied)


def lanpo_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_evaluate_a_damaged_checkpoint_is_one_line(tiny_model_path, tmp_path):
    _, (first, second) = two_checkpoints(tiny_model_path, tmp_path / "run")
    damage(second.path, "truncated")
    result = lanpo_cli("evaluate", "--model", str(second.path), "--set", f"paths.runs_dir={tmp_path / 'runs'}",
                       "--set", "rollout.backend=transformers",
                       env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 2, result.stderr[-3000:]
    one_line_error(result.stderr, f"checkpoint {second.path} (step 2) is damaged", "(truncated)",
                   f"previous checkpoint {first.path}")
    assert not (tmp_path / "runs" / "evaluations").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------- a full disk
class SmallDisk(type(Path())):
    """The mount point of a real filesystem of a few MiB (tmpfs)."""

    def resize(self, mib: float) -> None:
        subprocess.run(["mount", "-o", f"remount,size={int(mib)}m", str(self)], check=True)


@pytest.fixture()
def small_disk(tmp_path):
    mount = SmallDisk(tmp_path / "disk")
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def checkpoint_mib(tiny_model_path: str, tmp_path: Path) -> float:
    up = updater(tiny_model_path, tmp_path / "measure")
    up.step(batch(0))  # with the optimiser's moments
    info = up.save_checkpoint()
    return sum(p.stat().st_size for p in info.path.iterdir()) / 2**20


@pytest.mark.parametrize("background", [False, True])
def test_full_disk_publishes_nothing_and_resumes_to_the_same_checkpoint(tiny_model_path, tmp_path, small_disk,
                                                                        background):
    size = checkpoint_mib(tiny_model_path, tmp_path)
    reference = updater(tiny_model_path, tmp_path / "reference")
    reference.step(batch(0))
    want = reference.save_checkpoint()

    small_disk.resize(size * 0.6 + 1)  # room for the weights file, not for the optimiser state
    run = small_disk / "run"
    up = updater(tiny_model_path, run)
    up.step(batch(0))
    state = trained_state(up)
    with pytest.raises(OSError) as raised:
        up.save_checkpoint(background=background)
        up.wait_checkpoint()
    full = raised.value
    assert type(full).__name__ == "DiskFull"
    assert str(full).startswith(f"the disk holding {run / 'checkpoints'} is full (")
    assert f" on {small_disk}) while " in str(full)
    assert f"while writing checkpoint {run / 'checkpoints' / 'step-000001'} (nothing was published" in str(full)
    assert "run the same command again: the run resumes from its last complete checkpoint" in str(full)
    assert "\n" not in str(full)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []  # no half checkpoint, no temporary folder
    assert latest_checkpoint(run) is None

    small_disk.resize(size * 3 + 8)  # space freed
    again = up.save_checkpoint(background=background)
    up.wait_checkpoint()
    assert again.checksum == want.checksum
    assert verify_checkpoint(again.path).checksum == want.checksum
    assert list_checkpoints(run) == [again]

    fresh = updater(tiny_model_path, run)  # a new process resuming from it has the trained state
    fresh.load_checkpoint(again.path)
    assert_same_state(fresh, state)


def test_is_disk_full_reads_library_errors():
    assert ckpt.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device "
                                          "(os error 28)"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert ckpt.is_disk_full(wrapped)
    assert not ckpt.is_disk_full(RuntimeError("unexpected pos 576 vs 534"))
    import pickle

    err = ckpt.DiskFull(Path("/nowhere/run"), "writing x")
    back = pickle.loads(pickle.dumps(err))  # Prefect may persist a failed task's exception
    assert (type(back), str(back), back.folder, back.errno) == (type(err), str(err), err.folder, 28)


TINY = ["grpo.steps=2", "eval.every=0", "eval.at_start=false", "eval.limit=2", "eval.samples=1",
        "rollout.backend=transformers", "rollout.batch_problems=2", "rollout.num_generations=4",
        "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "lanpo.abstraction.max_new_tokens=16",
        "lanpo.abstraction.min_similarity=0.3", "grpo.bf16=false", "grpo.learning_rate=1e-2"]


def train_command(model: str, runs: Path) -> list[str]:
    return ["train", "--config", "configs/tiny-cpu.yaml", "--run-name", "disk",
            *[x for o in [f"model.name_or_path={model}", f"paths.runs_dir={runs}", *TINY] for x in ("--set", o)]]


@pytest.fixture(scope="module")
def reference_run(tiny_model_path, tmp_path_factory):
    """An uninterrupted `lanpo train` of two steps on a roomy disk: (its run folder, its final checkpoint, env)."""
    root = tmp_path_factory.mktemp("reference")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    done = lanpo_cli(*train_command(tiny_model_path, root / "runs"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = [d for d in (root / "runs").iterdir() if (d / "checkpoints").is_dir()]
    final = latest_checkpoint(run)
    assert final.step == 2
    assert len({c.checksum for c in list_checkpoints(run)}) == 2  # the updates change the weights
    return run, final, env


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_resumes_once_space_is_freed(tiny_model_path, tmp_path, small_disk,
                                                                           reference_run):
    """`lanpo train` with its runs folder on a real tmpfs too small for its checkpoints: one line naming the disk,
    exit status 2, no half checkpoint; after the tmpfs is grown the same command finishes with the checkpoint an
    uninterrupted run on a roomy disk writes."""
    _, want, env = reference_run
    size = checkpoint_mib(tiny_model_path, tmp_path)
    small_disk.resize(size * 0.6 + 1)
    command = train_command(tiny_model_path, small_disk / "runs")
    failed = lanpo_cli(*command, env=env)
    assert failed.returncode == 2, failed.stderr[-3000:]
    (run,) = [d for d in (small_disk / "runs").iterdir() if (d / "checkpoints").is_dir()]
    line = one_line_error(failed.stderr, f"the disk holding {run / 'checkpoints'} is full",
                          f" on {small_disk}) while writing checkpoint {run / 'checkpoints'}/step-",
                          "run the same command again")
    failed_step = int(line.split("/step-")[1][:6])
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [f"step-{s:06d}" for s in range(1, failed_step)]  # complete ones only, no temporary folder
    for info in list_checkpoints(run):
        verify_checkpoint(info.path)

    small_disk.resize(size * 4 + 16)
    resumed = lanpo_cli(*command, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = latest_checkpoint(run)
    assert (got.step, got.checksum) == (want.step, want.checksum)


@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_is_one_line_and_its_advice_works(tiny_model_path, reference_run):
    """The run's last checkpoint is lost and the one before has flipped bytes: resuming refuses it in one line; after
    deleting it, as the line says, the run repeats its updates and ends with the same weights."""
    run, want, env = reference_run
    first = ckpt.checkpoint_path(run, 1)
    shutil.rmtree(want.path)
    damage(first, "flipped")
    command = train_command(tiny_model_path, run.parent)
    refused = lanpo_cli(*command, env=env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    one_line_error(refused.stderr, f"checkpoint {first} (step 1) is damaged: model.safetensors: weight checksum "
                                   f"expected", "no earlier checkpoint is left: delete that folder and run the same "
                                                "`lanpo train` command again")
    shutil.rmtree(first)
    resumed = lanpo_cli(*command, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = latest_checkpoint(run)
    assert (got.step, got.checksum) == (want.step, want.checksum)
