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

Loading checks before use: `verify_checkpoint` raises `CheckpointDamaged` (one line: folder, step, expected vs
found, the previous checkpoint to resume from) for a truncated, altered or unreadable checkpoint. A write that fails
because the disk is full raises `DiskFull` naming the folder and its filesystem; the temporary folder is removed, so
once space is freed the same run resumes from its last complete checkpoint.

`CheckpointWriter` runs a write in the caller's thread or in a background thread, one at a time; the caller hands it
a snapshot so it may keep changing the live tensors meanwhile. This module knows nothing about models:
`PolicyUpdater` (update.py) passes a function that writes the files.
"""

from __future__ import annotations

import errno
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


class CheckpointDamaged(ValueError):
    """A checkpoint's files are not what its state.json records (truncated, altered or unreadable): it must not be
    used. The message says which checkpoint, what was expected and found, and which checkpoint to resume from."""

    def __init__(self, path: str | Path, step: int | None, problem: str) -> None:
        self.path, self.step = Path(path), step
        where = f"checkpoint {self.path}" + (f" (step {step})" if step is not None else "")
        super().__init__(f"{where} is damaged: {problem}; {_resume_advice(self.path, step)}")


class DiskFull(OSError):
    """A write failed because the filesystem it writes to is full (errno ENOSPC)."""

    def __init__(self, folder: str | Path, doing: str) -> None:
        self.folder = Path(folder)
        free, total, mount = _space(self.folder)
        message = (f"the disk holding {self.folder} is full ({_size(free)} free of {_size(total)} on {mount}) while "
                   f"{doing}; free space there and run the same command again: the run resumes from its last "
                   f"complete checkpoint")
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # OSError pickles its (errno, strerror) args, which do not fit __init__
        return _rebuild_disk_full, (self.folder, self.strerror)


def _rebuild_disk_full(folder: Path, message: str) -> DiskFull:
    err = DiskFull.__new__(DiskFull, errno.ENOSPC, message)
    OSError.__init__(err, errno.ENOSPC, message)
    err.folder = folder
    return err


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Libraries that do not keep the OSError say it in text (safetensors: "I/O error: No space left on device (os error
# 28)"); torch.save says only "unexpected pos", hence the free-space test in `disk_full_error`.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
DISK_FULL_FREE_BYTES = 16 << 20
"""A write that failed with less than this free on its filesystem is taken as a full disk, whatever its error says:
writes fill the disk before they fail, so a full disk shows as (close to) nothing free."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, reports a full disk (ENOSPC / EDQUOT)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(exc: BaseException, folder: str | Path, doing: str) -> DiskFull | None:
    """`exc` (raised by a write under `folder`) as a `DiskFull`, if the disk is the cause; else None."""
    if isinstance(exc, DiskFull):
        return exc
    if not isinstance(exc, Exception):
        return None
    free, _, _ = _space(Path(folder))
    if is_disk_full(exc) or (free is not None and free < DISK_FULL_FREE_BYTES):
        return DiskFull(folder, doing)  # raised `from exc`: the library's own error stays in the trace
    return None


def _space(folder: Path) -> tuple[int | None, int | None, str]:
    """(free bytes, total bytes, mount point) of the filesystem holding `folder` (or its nearest existing parent).
    Free is what this process may still write: root may use the blocks reserved for it."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None, None, str(probe)
    mount = probe.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize, st.f_blocks * st.f_frsize, str(mount)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _resume_advice(path: Path, step: int | None) -> str:
    """What to do about a damaged checkpoint: delete it, so that a resumed run falls back to the newest earlier one
    (its later updates are run again and reproduce the same weights)."""
    earlier = []
    if path.parent.name == CHECKPOINTS_DIRNAME:
        m = _STEP_RE.match(path.name)
        limit = step if step is not None else (int(m.group(1)) if m else None)
        earlier = [c for c in list_checkpoints(path.parent.parent)
                   if c.path != path and (limit is None or c.step < limit)]
    if earlier:
        return (f"to resume from the previous checkpoint {earlier[-1].path} (step {earlier[-1].step}), delete that "
                f"folder and run the same `lanpo train` command again")
    if path.parent.name == CHECKPOINTS_DIRNAME:
        return ("no earlier checkpoint is left: delete that folder and run the same `lanpo train` command again, "
                "which repeats the run's updates from the start")
    return "delete or replace that folder (copy it again from where it came from)"


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
            raise ValueError(f"{path.name}: not a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"{path.name}: {size} bytes, but its header alone claims {8 + n} (truncated or "
                             f"altered)")
        try:
            header = json.loads(f.read(n))
            base = 8 + n
            spans = {name: tuple(base + int(x) for x in entry["data_offsets"])
                     for name, entry in header.items() if name != "__metadata__"}
        except (ValueError, KeyError, TypeError) as e:  # flipped bytes in the header
            raise ValueError(f"{path.name}: unreadable header ({type(e).__name__}: {e})") from None
        # safetensors requires the tensors to cover the file exactly
        expected = max((end for _, end in spans.values()), default=base)
        if expected != size:
            raise ValueError(f"{path.name}: {size} bytes, its header describes {expected}"
                             + (" (truncated)" if size < expected else ""))
        if not spans:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            for name, (start, end) in spans.items():
                entry = header[name]
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
    """Recompute the weight checksum and compare it with state.json; raises `CheckpointDamaged` if they differ or a
    file cannot be read (FileNotFoundError if the folder is not a complete checkpoint: no state.json)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    try:
        state = read_state(path)
        step, recorded = int(state["step"]), str(state["checksum"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(path, None, f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})") from None
    recorded_files = state.get("weight_files") or {}
    found = [p.name for p in weight_files(path)]
    missing = sorted(set(recorded_files) - set(found))
    if missing or not found:
        raise CheckpointDamaged(path, step, f"weight files expected {sorted(recorded_files) or ['*.safetensors']}, "
                                            f"found {found or 'none'}")
    try:
        if int(state.get("format", 1)) == 1:
            actual, per_file = _files_sha256(path), {}
        else:
            actual, per_file = weights_checksum(path)
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(path, step, str(e)) from None
    if actual != recorded:
        bad = [n for n, c in per_file.items() if recorded_files.get(n) != c]
        what = f"{', '.join(bad)}: " if bad else ""
        raise CheckpointDamaged(path, step, f"{what}weight checksum expected {recorded[:12]}, found {actual[:12]} "
                                            f"(the bytes were altered)")
    return CheckpointInfo(path, step, recorded)


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
    final = checkpoint_path(run_dir, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    except OSError as exc:
        full = disk_full_error(exc, root, f"writing checkpoint {final}")
        if full is not None:
            raise full from exc
        raise
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
    except BaseException as exc:
        full = disk_full_error(exc, root, f"writing checkpoint {final} (nothing was published under that name)")
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
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
        `DiskFull` if it failed for lack of space, else `CheckpointWriteError` if it failed."""
        with self._lock:
            return self._wait()

    def _wait(self) -> CheckpointInfo | None:
        if self._thread is None:
            return None
        self._thread.join()
        info, result, error = self._info, self._result, self._error
        self._thread = self._info = self._result = self._error = None
        if isinstance(error, DiskFull):  # says all a user needs; the write thread's trace is in its notes
            raise error
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
