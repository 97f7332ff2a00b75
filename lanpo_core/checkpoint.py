"""Run checkpoints: atomic folders under `<run_dir>/checkpoints/`, keep-last-K, a checksum per checkpoint, RNG state.

Layout of one checkpoint (`<run_dir>/checkpoints/step-000003/`):

    model.safetensors, config.json, generation_config.json   full fine-tuning (a loadable HF model folder), or
    adapter_model.safetensors, adapter_config.json            LoRA (peft adapter only; base = `model.name_or_path`)
    tokenizer.json, tokenizer_config.json, chat_template.jinja  so the folder loads on its own (vLLM, eval)
    optimizer.pt, scheduler.pt                                torch state dicts
    rng.pt                                                    python / numpy / torch (+ CUDA) generator states
    state.json                                                step, optimizer steps, checksum, per-file sha256, ...

A checkpoint is written into `checkpoints/.tmp-step-000003-<random>/` and renamed to `step-000003` only when every
file (state.json last) is written and fsynced, so a reader never sees a half-written checkpoint: a folder named
`step-*` with a `state.json` is complete. After the rename, all but the newest `keep_last` checkpoints are deleted.

The checksum is sha256 over the weight files only (`*.safetensors`, sorted by name, as `name sha256` lines), so two
checkpoints with identical weights have the same checksum: later stages (evaluation, export) can use it as a cache
key. Optimiser and RNG files are not part of it.

This module knows nothing about models: `PolicyUpdater` (update.py) passes a function that writes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    """The checkpoint folder."""
    step: int
    """LANPO steps completed when it was written (the next step to run is `step + 1`)."""
    checksum: str
    """sha256 over the weight files (cache key for later stages)."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.is_file())


def weights_checksum(folder: str | Path) -> tuple[str, dict[str, str]]:
    """(checksum, {file name: sha256}) over the `*.safetensors` files of a folder."""
    per_file = {p.name: sha256_file(p) for p in weight_files(Path(folder))}
    if not per_file:
        raise FileNotFoundError(f"no *.safetensors weight files in {folder}")
    blob = "".join(f"{name} {digest}\n" for name, digest in sorted(per_file.items()))
    return hashlib.sha256(blob.encode()).hexdigest(), per_file


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    out: list[CheckpointInfo] = []
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if not m or not (child / STATE_FILE).is_file():
            continue
        try:
            state = read_state(child)
        except (OSError, json.JSONDecodeError):
            continue
        out.append(CheckpointInfo(child, int(state["step"]), str(state["checksum"])))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointInfo | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = read_state(path)
    return CheckpointInfo(path, int(state["step"]), str(state["checksum"]))


def verify_checkpoint(path: str | Path) -> CheckpointInfo:
    """Recompute the weight checksum and compare it with state.json (raises ValueError on a mismatch)."""
    info = checkpoint_info(path)
    actual, _ = weights_checksum(info.path)
    if actual != info.checksum:
        raise ValueError(f"checkpoint {info.path}: weight checksum {actual[:12]} != recorded {info.checksum[:12]}")
    return info


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(run_dir: str | Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
                     keep_last: int) -> CheckpointInfo:
    """Atomically create `<run_dir>/checkpoints/step-<step>`: `write_files(tmp)` fills a temporary folder, then the
    checksum and `state.json` are added and the folder is renamed into place. Older checkpoints beyond `keep_last`
    are removed afterwards."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        write_files(tmp)
        checksum, per_file = weights_checksum(tmp)
        full_state = {"format": FORMAT_VERSION, "step": step, "checksum": checksum, "weight_files": per_file,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **state}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside, then replace it
            old = root / f".old-{final.name}-{os.getpid()}-{random.getrandbits(32):08x}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep_last)
    return CheckpointInfo(final, step, checksum)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the removed folders."""
    found = list_checkpoints(run_dir)
    removed = []
    for info in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
    return removed


# ------------------------------------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
