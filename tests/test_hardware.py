"""`auto` precision: fp32 on a CPU without native bf16, bf16 where it is present (only the capability probe is mocked)."""

from __future__ import annotations

import pytest
import torch

from lanpo_core import hardware
from lanpo_core.config import build_config


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given (avx512_bf16, amx) flags; the rest of the decision runs for real."""
    def set_flags(avx512_bf16: bool, amx: bool, onednn_cap: str | None = None) -> None:
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: (avx512_bf16, amx))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if onednn_cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        hardware.bf16_support.cache_clear()
    yield set_flags
    hardware.bf16_support.cache_clear()


def test_auto_is_fp32_without_native_bf16(cpu):
    cpu(avx512_bf16=False, amx=False)
    support = hardware.bf16_support()
    assert support.native is False
    assert "neither AVX512-BF16 nor AMX" in support.reason
    assert hardware.resolve_bf16("auto") is False
    assert hardware.resolve_dtype("auto") == "float32"


@pytest.mark.parametrize("flags", [(True, False), (False, True), (True, True)])
def test_auto_is_bf16_with_avx512_bf16_or_amx(cpu, flags):
    cpu(*flags)
    assert hardware.bf16_support().native is True
    assert hardware.resolve_bf16("auto") is True
    assert hardware.resolve_dtype("auto") == "bfloat16"


def test_onednn_isa_cap_below_bf16_means_fp32(cpu):
    cpu(avx512_bf16=True, amx=True, onednn_cap="avx2")
    support = hardware.bf16_support()
    assert support.native is False
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in support.reason


def test_explicit_settings_are_kept(cpu):
    cpu(avx512_bf16=False, amx=False)
    assert hardware.resolve_bf16(True) is True
    assert hardware.resolve_dtype("bfloat16") == "bfloat16"
    cpu(avx512_bf16=True, amx=True)
    assert hardware.resolve_bf16(False) is False
    assert hardware.resolve_dtype("float32") == "float32"


def test_defaults_are_auto_and_reach_the_trainer_and_the_record(cpu, tmp_path):
    from lanpo_core.update import build_grpo_args

    cfg = build_config({})
    assert cfg.grpo.bf16 == "auto"
    assert cfg.rollout.vllm.dtype == "auto"
    assert cfg.rollout.transformers_dtype == "auto"
    cpu(avx512_bf16=False, amx=False)
    assert build_grpo_args(cfg, tmp_path).bf16 is False
    record = hardware.describe(cfg)
    assert record["precision/update_bf16"] == "false"
    assert record["precision/vllm_dtype"] == "float32"
    assert record["precision/transformers_dtype"] == "float32"
    assert record["hardware/cpu"]  # the CPU model, read from the machine (not mocked)
    cpu(avx512_bf16=True, amx=False)
    assert build_grpo_args(cfg, tmp_path).bf16 is True
    assert hardware.describe(cfg)["precision/vllm_dtype"] == "bfloat16"


def test_transformers_engine_follows_auto(cpu, tiny_model_path):
    from lanpo_core.rollout import RolloutRequest, SamplingSpec, make_engine

    cfg = build_config({"rollout": {"backend": "transformers", "max_new_tokens": 4}})
    cpu(avx512_bf16=False, amx=False)
    assert make_engine(cfg, tiny_model_path).dtype == "float32"
    cpu(avx512_bf16=True, amx=True)
    engine = make_engine(cfg, tiny_model_path)
    assert engine.dtype == "bfloat16"
    out = engine.generate([RolloutRequest(messages=[{"role": "user", "content": "1+1?"}], n=2)],
                          SamplingSpec(temperature=1.0, max_new_tokens=4, seed=0))
    assert len(out) == 2
    assert all(len(c.logprobs) == len(c.completion_ids) > 0 for c in out)
    assert all(lp <= 0.0 for c in out for lp in c.logprobs)
