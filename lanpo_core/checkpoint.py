"""Run checkpoints: atomic folders under `<run_dir>/checkpoints/`, keep-last-K, a checksum per checkpoint, RNG state.

Layout of one checkpoint (`<run_dir>/checkpoints/step-000003/`):

    model.safetensors, config.json, generation_config.json   full fine-tuning (a loadable HF model folder), or
    adapter_model.safetensors, adapter_config.json            LoRA (peft adapter only; base = `model.name_or_path`)
    tokenizer.json, tokenizer_config.json, chat_template.jinja  so the folder loads on its own (vLLM, eval)
    optimizer.pt, scheduler.pt                                torch state dicts
    rng.pt                                                    python / numpy / torch (+ CUDA) generator states
    state.json                                                step, optimizer steps, checksum, ...

A checkpoint is written into `checkpoints/.tmp-step-000003-<random>/` and renamed to `step-000003` only when every
file (state.json last) is written and fsynced, so a reader never sees a half-written checkpoint: a folder named
`step-*` with a `state.json` is complete. After the rename, all but the newest `keep_last` checkpoints are deleted.

The checksum covers the weight tensors, not the file bytes: per tensor (sorted by name) its name, safetensors dtype,
shape and an xxh3-128 digest of its raw bytes, and sha256 over those lines. The same value comes from tensors in
memory (`tensors_checksum`, known before anything is written) and from the `*.safetensors` files of a folder
(`weights_checksum`, whatever their sharding), and two checkpoints with identical weights have the same checksum:
later stages (evaluation, export) use it as a cache key. Optimiser and RNG files are not part of it. (Format 1
checkpoints recorded sha256 over the weight files; `verify_checkpoint` still checks those.)

`CheckpointWriter` runs a write in the caller's thread or in a background thread, one at a time; the caller hands it
a snapshot so it may keep changing the live tensors meanwhile. This module knows nothing about models:
`PolicyUpdater` (update.py) passes a function that writes the files.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_FILE = "state.json"
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    """The checkpoint folder."""
    step: int
    """LANPO steps completed when it was written (the next step to run is `step + 1`)."""
    checksum: str
    """Checksum of the weight tensors (cache key for later stages)."""


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed; nothing was published under the checkpoint's name."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


# ------------------------------------------------------------------------------------------------ checksum
# torch dtype name -> safetensors dtype tag, so a tensor in memory and the same tensor in a file hash alike
_DTYPE_TAGS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32",
               "uint64": "U64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _tensor_line(name: str, tag: str, shape: list[int] | tuple[int, ...], data) -> str:
    import xxhash

    # xxh3 runs at memory speed (sha256 is an order of magnitude slower) and releases the GIL on large buffers, so a
    # write thread hashing does not stall the trainer; sha256 over the short lines keeps the checksum's form.
    return f"{name}\t{tag}\t{','.join(str(int(d)) for d in shape)}\t{xxhash.xxh3_128(data).hexdigest()}\n"


def _combine(lines: list[str]) -> str:
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def tensors_checksum(tensors: Mapping[str, Any]) -> str:
    """Checksum of named tensors, as `weights_checksum` computes it from the safetensors files they are saved to."""
    import torch

    lines = []
    for name, t in tensors.items():
        tag = _DTYPE_TAGS.get(str(t.dtype).removeprefix("torch."))
        if tag is None:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors tag (expected one of "
                             f"{sorted(_DTYPE_TAGS)})")
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.detach().contiguous().reshape(-1)
        lines.append(_tensor_line(name, tag, tuple(t.shape), flat.view(torch.uint8).numpy()))
    return _combine(lines)


def copy_tensor(t):
    """A detached, contiguous copy of a tensor. On CPU it is one memcpy in this thread (numpy, which releases the
    GIL), not torch's intra-op thread pool: with the cores shared (the normal case during a run) a parallel copy
    waits for its slowest thread and is several times slower."""
    import numpy as np
    import torch

    t = t.detach()
    if t.device.type != "cpu" or t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    if not t.is_contiguous():
        return t.contiguous()  # a new tensor already
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    np.copyto(out.reshape(-1).view(torch.uint8).numpy(), t.reshape(-1).view(torch.uint8).numpy())
    return out


def _safetensors_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(tensor name, checksum line) for every tensor of a safetensors file, hashed straight from its bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"{path}: header of {n} bytes exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
        base = 8 + n
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = (base + int(x) for x in entry["data_offsets"])
                if end > size:
                    raise ValueError(f"{path}: tensor {name} ends at byte {end}, past the end of the file ({size})")
                with view[start:end] as data:
                    yield name, _tensor_line(name, entry["dtype"], entry["shape"], data)


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.is_file())


def weights_checksum(folder: str | Path) -> tuple[str, dict[str, str]]:
    """(checksum, {file name: checksum of its tensors}) over the `*.safetensors` files of a folder."""
    files = weight_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {folder}")
    lines: dict[str, str] = {}
    per_file = {}
    for p in files:
        mine = []
        for name, line in _safetensors_lines(p):
            if name in lines:
                raise ValueError(f"{folder}: tensor {name} is stored in more than one weight file")
            lines[name] = line
            mine.append(line)
        per_file[p.name] = _combine(mine)
    return _combine(list(lines.values())), per_file


def _files_sha256(folder: Path) -> str:
    """Format 1 checksum: sha256 over `name sha256` lines of the weight files' bytes."""
    per_file = {}
    for p in weight_files(folder):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        per_file[p.name] = h.hexdigest()
    if not per_file:
        raise FileNotFoundError(f"no *.safetensors weight files in {folder}")
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(per_file.items())).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ reading
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
    if int(read_state(info.path).get("format", 1)) == 1:
        actual = _files_sha256(info.path)
    else:
        actual, _ = weights_checksum(info.path)
    if actual != info.checksum:
        raise ValueError(f"checkpoint {info.path}: weight checksum {actual[:12]} != recorded {info.checksum[:12]}")
    return info


# ------------------------------------------------------------------------------------------------ writing
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
                     keep_last: int, checksum: str | None = None) -> CheckpointInfo:
    """Atomically create `<run_dir>/checkpoints/step-<step>`: `write_files(tmp)` fills a temporary folder, then the
    checksum and `state.json` are added and the folder is renamed into place. With `checksum` (computed from the
    tensors before writing) the written weights must reproduce it, else nothing is published. Older checkpoints
    beyond `keep_last` are removed afterwards."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        write_files(tmp)
        actual, per_file = weights_checksum(tmp)
        if checksum is not None and actual != checksum:
            raise ValueError(f"checkpoint {final}: the written weights have checksum {actual[:12]}, the snapshot "
                             f"had {checksum[:12]} (tensors changed while being written, or the writer renamed or "
                             f"converted them)")
        full_state = {"format": FORMAT_VERSION, "step": step, "checksum": actual, "weight_files": per_file,
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
    return CheckpointInfo(final, step, actual)


_CRC_LOCK = threading.Lock()


def torch_save_fast(obj: Any, path: Path) -> None:
    """`torch.save` without the per-record CRC32 of its zip format, which costs more than writing the bytes (torch.load
    does not need it; the weights have their own checksum). The switch is process-wide, so it is held only for
    this call, under a lock."""
    import torch
    from torch.serialization import get_crc32_options, set_crc32_options

    with _CRC_LOCK:
        before = get_crc32_options()
        set_crc32_options(False)
        try:
            torch.save(obj, path)
        finally:
            set_crc32_options(before)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the removed folders. A write in progress
    is a `.tmp-*` folder and never touched; `write_checkpoint` prunes after its own rename, and `CheckpointWriter`
    never runs two writes at once."""
    found = list_checkpoints(run_dir)
    removed = []
    for info in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
    return removed


WRITER_NICE = 10
"""Niceness of the background write thread (Linux). Torch's intra-op threads wait for each other at every op, so a
writer taking a core at equal priority slows a concurrent forward pass far more than its own CPU time."""


def _lower_thread_priority(nice: int) -> None:
    # On Linux, setpriority on a thread id changes only that thread (elsewhere it would be the whole process).
    if sys.platform.startswith("linux") and nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass


class CheckpointWriter:
    """Runs checkpoint writes one at a time, in the caller's thread or in a background thread.

    `job` must only touch its own snapshot (and files), never objects the caller keeps changing. A failed background
    write is re-raised, once, by the next `wait()` (which `submit` calls first). Safe to call from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._info: CheckpointInfo | None = None
        self._result: CheckpointInfo | None = None
        self._error: BaseException | None = None

    def submit(self, info: CheckpointInfo, job: Callable[[], CheckpointInfo], background: bool) -> CheckpointInfo:
        """Run `job` (which writes `info.path`); in the background, return at once. Waits for a pending write first."""
        with self._lock:
            self._wait()
            if not background:
                return job()
            self._info = info

            def run() -> None:
                _lower_thread_priority(WRITER_NICE)
                try:
                    self._result = job()
                except BaseException as exc:  # noqa: BLE001 - handed to wait(), which re-raises it
                    # a traceback keeps its frames, and so the snapshot (GBs), alive: keep its text, drop the frames
                    exc.add_note("in the checkpoint write thread:\n"
                                 + "".join(traceback.format_exception(exc)).rstrip())
                    seen: set[int] = set()
                    e: BaseException | None = exc
                    while e is not None and id(e) not in seen:
                        seen.add(id(e))
                        e.__traceback__ = None
                        e = e.__cause__ or e.__context__
                    self._error = exc

            # not a daemon: a process that exits normally finishes the write first
            self._thread = threading.Thread(target=run, name=f"checkpoint-{info.path.name}", daemon=False)
            self._thread.start()
            return info

    def wait(self) -> CheckpointInfo | None:
        """Block until the pending write is on disk; return its info (None if nothing was pending). Raises
        `CheckpointWriteError` if it failed."""
        with self._lock:
            return self._wait()

    def _wait(self) -> CheckpointInfo | None:
        if self._thread is None:
            return None
        self._thread.join()
        info, result, error = self._info, self._result, self._error
        self._thread = self._info = self._result = self._error = None
        if error is not None:
            raise CheckpointWriteError(f"writing checkpoint {info.path} failed: {type(error).__name__}: {error}") \
                from error
        return result


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
