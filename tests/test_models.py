"""Bundled and local model resolution, offline; safe concurrent preparation of the bundled policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lanpo_core.models import (ModelNotFoundError, load_embedder, load_policy, prepare_smollm2, resolve_embedder,
                               resolve_policy)

REPO = Path(__file__).resolve().parents[1]


def test_bundled_policy_is_a_real_chat_model(smollm2_path):
    import torch

    model, tokenizer = load_policy(smollm2_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == tokenizer.eos_token
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3? Answer with only the number."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in text


def test_bundled_name_resolves_to_prepared_folder(smollm2_path):
    resolved = resolve_policy("smollm2-135m-instruct")
    assert resolved.kind == "bundled"
    assert resolved.path == smollm2_path
    assert (Path(smollm2_path) / ".lanpo-complete").is_file()
    assert (Path(smollm2_path) / "model.safetensors").stat().st_size > 500e6


def test_local_folder_and_errors(tiny_model_path, tmp_path):
    assert resolve_policy(tiny_model_path).kind == "local"
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_policy(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="neither a bundled name"):
        resolve_policy("not-a-model")


def test_hub_model_fails_plainly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'Qwen/Qwen2.5-Math-1.5B' from the hub: hub access is disabled"):
        load_policy("Qwen/Qwen2.5-Math-1.5B")


def test_bundled_embedder_gives_meaningful_vectors():
    assert resolve_embedder("all-minilm-l6-v2").kind == "bundled"
    embedder = load_embedder("all-minilm-l6-v2")
    cat, feline, stocks = embedder.encode(["cat", "feline", "stock market"], normalize_embeddings=True)
    assert cat.shape == (384,)
    assert float(cat @ feline) > 0.4 > float(cat @ stocks)


def test_stale_partial_folder_is_replaced(tmp_path, smollm2_path, monkeypatch):
    """A folder left by a crashed preparation (no completion marker) is rebuilt, not trusted."""
    import lanpo_core.models as models

    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: Path(smollm2_path) / "model.safetensors")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: _Saver(smollm2_path))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: _Saver(smollm2_path))
    out = prepare_smollm2(tmp_path)
    assert out == stale
    assert (out / ".lanpo-complete").is_file()
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").read_text() != "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2")]


class _Saver:
    """Writes the real prepared files where save_pretrained is asked to (keeps this test fast)."""

    hf_quantizer = None

    def __init__(self, source):
        self.source = Path(source)

    def save_pretrained(self, target):
        import shutil

        for f in self.source.iterdir():
            if not f.name.startswith("."):
                shutil.copy(f, Path(target) / f.name)


@pytest.mark.slow
def test_two_processes_preparing_at_once_do_not_corrupt(tmp_path):
    """Real GGUF conversion in two processes started together: one converts, the other waits and reuses."""
    code = ("import sys; from pathlib import Path; from lanpo_core.models import prepare_smollm2; "
            "print(prepare_smollm2(Path(sys.argv[1])))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / "smollm2-135m-instruct")
    model, _ = load_policy(outs[0])
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
