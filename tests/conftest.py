"""Shared test set-up: offline hub, a shared model cache, the shared data folder, tiny random-weight models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")  # vLLM accepts only "1"
os.environ.setdefault("LANPO_SHARED_DATA", str(REPO.parent / "shared" / "data"))
# Prefect: a fresh home (database, results) per test session, never the user's ~/.prefect; no server is assumed
# (flows start Prefect's ephemeral API) and none may be left running.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lanpo-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ["LANPO_SHARED_DATA"])
    if not path.is_dir():
        pytest.fail(f"shared data folder not found at {path} (set LANPO_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real bundled SmolLM2-135M-Instruct, prepared once into the lanpo cache (about 40 s the first time)."""
    from lanpo_core.models import resolve_policy

    return resolve_policy("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A tiny random-weight Llama with SmolLM2's tokenizer and chat template, saved to a folder (fast unit tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lanpo_core.models import resolve_policy

    tokenizer = AutoTokenizer.from_pretrained(resolve_policy("smollm2-135m-instruct").path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
