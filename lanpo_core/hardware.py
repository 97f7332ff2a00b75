"""What this machine computes fast: the run-time precision choice behind every `auto` dtype setting.

bf16 pays only where the hardware has native bf16 matmuls: CUDA devices that support it, and CPUs with
AVX512-BF16 or AMX. Elsewhere PyTorch falls back to a single-threaded reference GEMM for bf16 that is orders of
magnitude slower than fp32 (docs/defaults.md, "Precision"), so `auto` means fp32 there.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

# oneDNN ISA ceilings (ONEDNN_MAX_CPU_ISA) that leave out its bf16 kernels: a CPU with the flags still computes bf16
# slowly when oneDNN is capped below AVX512_CORE_BF16 (users and benchmarks set it to emulate an AVX2 machine).
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    """bf16 matmuls run natively (fast) on the device that computes."""
    reason: str
    """One line saying why, for the log and the MLflow params."""


def cpu_name() -> str:
    """The CPU model as `lscpu` names it (recorded next to every measured figure)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> tuple[bool, bool]:
    """(avx512_bf16, amx) as PyTorch's cpuinfo reports them."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported()), bool(torch.cpu._is_amx_tile_supported())


@lru_cache(maxsize=1)
def bf16_support() -> Bf16Support:
    """Does bf16 compute natively here? Decided once per process from the device's capabilities."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return Bf16Support(True, f"CUDA device {name} supports bf16")
        return Bf16Support(False, f"CUDA device {name} has no bf16 support")
    avx512_bf16, amx = _cpu_flags()
    cpu = cpu_name()
    if not (avx512_bf16 or amx):
        return Bf16Support(False, f"CPU {cpu} has neither AVX512-BF16 nor AMX: bf16 would run on a slow fallback")
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in _ONEDNN_NO_BF16:
        return Bf16Support(False, f"CPU {cpu} has bf16 instructions but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from them")
    found = " and ".join(name for name, ok in (("AVX512-BF16", avx512_bf16), ("AMX", amx)) if ok)
    return Bf16Support(True, f"CPU {cpu} has {found}")


def resolve_bf16(setting: bool | str) -> bool:
    """`grpo.bf16` (true, false or `auto`) -> whether the update runs under bf16 autocast."""
    if setting == "auto":
        return bf16_support().native
    return bool(setting)


def resolve_dtype(setting: str) -> str:
    """A compute dtype setting (`auto`, `bfloat16`, `float32`, ...) -> the dtype name to use."""
    if setting == "auto":
        return "bfloat16" if bf16_support().native else "float32"
    return setting


def describe(config) -> dict[str, str]:
    """The precision every stage of `config` resolves to, and why (logged, and recorded as MLflow params)."""
    import torch

    support = bf16_support()
    return {
        "precision/update_bf16": str(resolve_bf16(config.grpo.bf16)).lower(),
        "precision/vllm_dtype": resolve_dtype(config.rollout.vllm.dtype),
        "precision/transformers_dtype": resolve_dtype(config.rollout.transformers_dtype),
        "precision/reason": support.reason,
        "hardware/cpu": cpu_name(),
        "hardware/torch_threads": str(torch.get_num_threads()),
    }
