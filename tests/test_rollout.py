"""Rollout engines: API validation, the package layout, the prompt policy, and real generation on the bundled
SmolLM2 with both backends: log-probs against a forward pass, determinism, finish reasons, weight sync, and clean
shutdown.

The transformers tests share one in-process model. The vLLM tests (marked slow) share one float32 engine per module:
float32 so that log-probs can be held to a tight tolerance against a float32 forward pass."""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lanpo_core.config import RunConfig
from lanpo_core.rollout import (BackendUnavailable, Completion, RolloutEngine, RolloutError, RolloutRequest,
                                SamplingSpec, TransformersEngine, derive_seed, iter_model_weights, make_engine,
                                render_prompt)

ARITH = "What is {a}+{b}? Answer with only the number."


def _chat(q: str, **kw) -> RolloutRequest:
    return RolloutRequest(messages=[{"role": "user", "content": q}], **kw)


def _arith(pairs, n=2) -> list[RolloutRequest]:
    return [_chat(ARITH.format(a=a, b=b), n=n, tags={"problem": f"{a}+{b}", "kind": "plain"}) for a, b in pairs]


def _reference_logits(model, c: Completion) -> torch.Tensor:
    """Next-token logits at each completion position: one unpadded float32 forward pass over prompt + completion."""
    ids = torch.tensor([c.prompt_ids + c.completion_ids])
    with torch.no_grad():
        return model(ids).logits[0, len(c.prompt_ids) - 1: -1].float()


def _logprobs(logits: torch.Tensor, c: Completion, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.completion_ids)[:, None])[:, 0]


def _check_raw_logprobs(model, out: list[Completion]) -> None:
    """Engine log-probs == raw (T=1) log-probs of a forward pass, and clearly not the tempered (T=0.7) ones."""
    got, raw, tempered = [], [], []
    for c in out:
        assert len(c.completion_ids) == len(c.logprobs) >= 1
        logits = _reference_logits(model, c)
        got.append(torch.tensor(c.logprobs))
        raw.append(_logprobs(logits, c))
        tempered.append(_logprobs(logits, c, 0.7))
    got, raw, tempered = torch.cat(got), torch.cat(raw), torch.cat(tempered)
    assert (raw - got).abs().max() < 1e-3
    assert (tempered - got).abs().max() > 0.05


# ------------------------------------------------------------------------------------------------ API validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(messages=[]), "non-empty list"),
    (dict(messages=None, text=None), "exactly one"),
    (dict(messages=[{"role": "user", "content": "x"}], text="x"), "exactly one"),
    (dict(messages=[{"role": "user", "content": "x"}], n=0), "n must be"),
    (dict(messages=[{"role": "user", "content": "x"}], n=2.0), "n must be"),
    (dict(messages=[{"role": "user"}]), "string 'role' and 'content'"),
    (dict(messages=[{"role": "user", "content": "   "}]), "empty"),
    (dict(text="  "), "non-empty"),
    (dict(text="x", tags=["a"]), "tags must be a dict"),
])
def test_bad_requests_are_refused_with_a_clear_error(kwargs, match):
    with pytest.raises(RolloutError, match=match):
        RolloutRequest(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=("",)), "stop"), (dict(seed=-1), "seed"),
])
def test_bad_sampling_is_refused(kwargs, match):
    with pytest.raises(RolloutError, match=match):
        SamplingSpec(**kwargs)


def test_sampling_from_config():
    cfg = RunConfig()
    cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens = 0.7, 0.9, 20, 48
    s = SamplingSpec.from_config(cfg)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed) == (0.7, 0.9, 20, 48, cfg.seed)
    assert SamplingSpec.from_config(cfg, step=1).seed == SamplingSpec.from_config(cfg, step=1).seed
    assert SamplingSpec.from_config(cfg, step=1).seed != SamplingSpec.from_config(cfg, step=2).seed
    g = SamplingSpec.from_config(cfg.rollout, temperature=0, stop="\n\n")
    assert g.greedy
    assert g.stop == ("\n\n",)
    with pytest.raises(RolloutError, match="unknown sampling"):
        SamplingSpec.from_config(cfg, temprature=1.0)


def test_derived_seeds_are_pinned():
    # the step, batch and request seeds of every run hang on these values: a change would change every checkpoint
    assert [derive_seed(0, 1), derive_seed(0, 2), derive_seed(42, 0, 7), derive_seed(123, 5)] == [
        1392833265, 363336363, 725996209, 1256925778]
    assert SamplingSpec.from_config(RunConfig(seed=0), step=1).seed == 1392833265


# ------------------------------------------------------------------------------------------------ package layout
ROLLOUT_PKG = Path(__file__).resolve().parents[1] / "lanpo_core" / "rollout"
BACKENDS = ("transformers", "vllm")


@pytest.mark.parametrize("module", ["lanpo_core.rollout", "lanpo_core.rollout.base",
                                    *(f"lanpo_core.rollout.{b}" for b in BACKENDS)])
def test_each_rollout_module_imports_alone_and_light(module):
    """A fresh interpreter per module: an import cycle would fail here. Neither torch nor vLLM is imported."""
    code = f"import sys, {module}; print(sorted({{'torch', 'vllm', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROLLOUT_PKG.parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _sibling_imports(module: str) -> list[tuple[str, str]]:
    """(sibling module, name) for every `from .x import name` / `from . import x` in a module of the package."""
    tree = ast.parse((ROLLOUT_PKG / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                found.append((node.module, alias.name) if node.module else (alias.name, "*"))
    return found


def test_backends_import_only_public_names_of_the_shared_module():
    modules = sorted(p.stem for p in ROLLOUT_PKG.glob("*.py"))
    assert {"__init__", "base", *BACKENDS} <= set(modules)
    for module in modules:
        imports = _sibling_imports(module)
        assert not [n for _, n in imports if n.startswith("_")], f"{module} imports private names: {imports}"
        if module != "__init__":
            assert {m for m, _ in imports} <= {"base"}, f"{module} imports another backend: {imports}"
    assert ("base", "EngineBase") in _sibling_imports("vllm")  # the check above does see the imports


# ------------------------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def test_prompt_rendering_uses_the_chat_template_or_the_raw_text(tokenizer):
    chat = render_prompt(tokenizer, _chat("Problem: 2+2."), 1000)
    text = tokenizer.decode(chat.ids)
    assert not chat.refused
    assert "Problem: 2+2." in text
    assert text.rstrip().endswith("assistant")
    raw = render_prompt(tokenizer, RolloutRequest(text="Q: 2+2?\nA:"), 1000)
    assert tokenizer.decode(raw.ids).endswith("Q: 2+2?\nA:")
    assert len(raw.ids) < len(chat.ids)


def test_overlong_prompts_are_refused(tokenizer):
    req = _chat("Problem: what is 17+25? " * 20)
    n = len(render_prompt(tokenizer, req, 10_000).ids)
    fits = render_prompt(tokenizer, req, n)
    assert not fits.refused
    assert len(fits.ids) == n
    refused = render_prompt(tokenizer, req, n - 1)
    assert refused.refused
    assert f"{n} tokens > limit {n - 1}" in refused.reason
    assert refused.ids == fits.ids  # the prompt is reported whole, never cut


# ------------------------------------------------------------------------------------------------ backend choice
def test_auto_falls_back_to_transformers_with_a_logged_reason(monkeypatch, caplog, tiny_model_path):
    import lanpo_core.rollout.vllm as rv

    monkeypatch.setattr(rv, "vllm_status", lambda vcfg=None: (False, "no vLLM in this test"))
    cfg = RunConfig()
    with caplog.at_level(logging.WARNING, logger="lanpo_core.rollout"):
        engine = make_engine(cfg, tiny_model_path)
    assert isinstance(engine, TransformersEngine)
    assert isinstance(engine, RolloutEngine)
    assert "no vLLM in this test" in caplog.text
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(_arith([(1, 2)]), SamplingSpec())
    cfg.rollout.backend = "vllm"
    with pytest.raises(BackendUnavailable, match="no vLLM in this test"):
        make_engine(cfg, tiny_model_path)


def test_torchvision_import_error_becomes_an_instruction(monkeypatch):
    import builtins

    import lanpo_core.rollout.vllm as rv

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(rv, "_STATUS", None)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    ok, why = rv.vllm_status()
    assert not ok
    assert "pip uninstall -y torchvision" in why
    monkeypatch.setattr(rv, "_STATUS", None)  # don't leave the fake answer cached


def test_cpu_env_defaults_respect_the_user(monkeypatch):
    import lanpo_core.rollout.vllm as rv
    from lanpo_core.config import VllmConfig

    monkeypatch.setattr(rv, "_on_gpu", lambda: False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    applied = rv.apply_cpu_env_defaults(VllmConfig(cpu_kv_cache_gib=3))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == rv._cpu_list(os.sched_getaffinity(0))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "VLLM_CPU_KVCACHE_SPACE" not in applied
    assert rv._cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_engine_creation_inside_a_spawn_reimport_is_refused(monkeypatch):
    import multiprocessing

    import lanpo_core.rollout.vllm as rv

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match='if __name__ == "__main__"'):
        rv._check_main_guard()


# ------------------------------------------------------------------------------------------------ transformers backend
@pytest.fixture(scope="module")
def hf_engine(smollm2_path):
    cfg = RunConfig()
    cfg.rollout.max_prompt_tokens = 200
    cfg.rollout.transformers_dtype = "float32"  # compared with a float32 forward pass below
    engine = make_engine(cfg, smollm2_path, backend="transformers")
    assert engine.backend == "transformers"
    assert engine.logprobs_mode == "raw"
    yield engine
    engine.close()


def test_hf_raw_logprobs_match_a_forward_pass(hf_engine):
    out = hf_engine.generate(_arith([(3, 4), (5, 2)], n=3), SamplingSpec(temperature=0.7, max_new_tokens=8))
    assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(2) for j in range(3)]
    assert out[4].tags == {"problem": "5+2", "kind": "plain"}
    assert all(1 <= len(c.completion_ids) <= 8 for c in out)
    _check_raw_logprobs(hf_engine.model, out)


def test_hf_processed_logprobs_follow_temperature_and_top_k(hf_engine):
    processed = TransformersEngine(hf_engine.model, hf_engine.tokenizer, logprobs_mode="processed")
    out = processed.generate(_arith([(3, 4), (6, 1)], n=2),
                             SamplingSpec(temperature=0.7, top_k=20, max_new_tokens=8, seed=5))
    for c in out:
        ref = _logprobs(_reference_logits(hf_engine.model, c), c, temperature=0.7, top_k=20)
        assert (ref - torch.tensor(c.logprobs)).abs().max() < 1e-3


def test_hf_same_seed_same_completions_and_caller_rng_untouched(hf_engine):
    reqs = _arith([(2, 3), (4, 4)], n=3)
    s = SamplingSpec(temperature=1.0, max_new_tokens=6, seed=123)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = hf_engine.generate(reqs, s)
    assert torch.equal(state, torch.random.get_rng_state())
    b = hf_engine.generate(reqs, s)
    c = hf_engine.generate(reqs, SamplingSpec(temperature=1.0, max_new_tokens=6, seed=124))
    assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.completion_ids for x in a] != [x.completion_ids for x in c]


def test_hf_finish_reasons(hf_engine):
    eos = hf_engine.tokenizer.eos_token_id
    greedy = SamplingSpec(temperature=0, max_new_tokens=14)
    short, long_ = hf_engine.generate([_chat("What is 2+2? Answer with only the number."),
                                       _chat("Write a long story about a dragon.")], greedy)
    assert short.finish_reason == "stop"
    assert short.completion_ids[-1] == eos
    assert len(short.completion_ids) < 14
    assert short.stop_string is None
    assert "4" in short.text
    assert long_.finish_reason == "length"
    assert len(long_.completion_ids) == 14
    assert eos not in long_.completion_ids
    # a stop string taken from the middle of the greedy answer: the text ends right before it
    stop = long_.text[20:26]
    cut = hf_engine.generate([_chat("Write a long story about a dragon.")],
                             SamplingSpec(temperature=0, max_new_tokens=14, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.stop_string == stop
    assert cut.text == long_.text[: long_.text.index(stop)]
    assert cut.completion_ids == long_.completion_ids[: len(cut.completion_ids)] and len(cut.logprobs) == len(
        cut.completion_ids)
    assert stop in hf_engine.tokenizer.decode(cut.completion_ids)


def test_hf_overlong_requests_are_counted_and_refused_ones_stay_aligned(hf_engine, caplog):
    before = dict(hf_engine.stats)
    reqs = [_chat("What is 1+1?", n=2, tags={"id": "ok1"}),
            _chat("What is 2+2? " * 100, n=2, tags={"id": "huge"}),
            _chat("What is 3+3?", tags={"id": "ok2"})]
    with caplog.at_level(logging.WARNING, logger="lanpo_core.rollout"):
        out = hf_engine.generate(reqs, SamplingSpec(temperature=0.7, max_new_tokens=4))
    assert [c.tags["id"] for c in out] == ["ok1", "ok1", "huge", "huge", "ok2"]
    assert [c.finish_reason for c in out[2:4]] == ["refused", "refused"]
    assert out[2].completion_ids == []
    assert len(out[2].prompt_ids) > 200
    assert out[2].logprobs == []
    assert out[2].text == ""
    assert all(c.finish_reason in ("stop", "length") and c.completion_ids for c in out[:2] + out[4:])
    assert hf_engine.stats["prompts_refused"] == before["prompts_refused"] + 1
    assert hf_engine.stats["sequences"] == before["sequences"] + 5
    assert "refused request 1 {'id': 'huge'}" in caplog.text
    assert "> limit 200" in caplog.text


def test_hf_weight_sync_by_reference_and_by_copy(hf_engine):
    model = hf_engine.model
    version = hf_engine.policy_version
    assert hf_engine.sync_from(model) == 0.0
    assert hf_engine.policy_version == version + 1
    greedy = SamplingSpec(temperature=0, max_new_tokens=4)
    req = [_chat("What is the capital of France?")]
    before = hf_engine.generate(req, greedy)[0]
    assert before.policy_version == version + 1
    original = {k: v.clone() for k, v in model.state_dict().items()}
    broken = {k: (v * 0 if "down_proj" in k else v) for k, v in original.items()}
    hf_engine.load_weights(broken)
    assert hf_engine.generate(req, greedy)[0].completion_ids != before.completion_ids
    hf_engine.load_weights(original.items())
    assert hf_engine.generate(req, greedy)[0].completion_ids == before.completion_ids
    with pytest.raises(RolloutError, match="not in the engine's model"):
        hf_engine.load_weights({"no.such.weight": torch.zeros(1)})


def test_sync_from_a_lora_model_serves_the_merged_policy(tiny_model_path):
    """A peft LoRA policy is synced as base + delta (merged on the fly); the trainer's model stays unmerged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(tiny_model_path), tok)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        before = engine.model(ids).logits
        assert (want - before).abs().max() > 1e-3  # the adapter matters
        engine.sync_from(policy)
        assert torch.allclose(engine.model(ids).logits, want, atol=1e-4)
        assert torch.allclose(policy(input_ids=ids).logits, want, atol=1e-5)  # unmerged again
    names = [n for n, _ in iter_model_weights(policy)]
    assert "lm_head.weight" not in names  # tied: once
    assert "model.embed_tokens.weight" in names
    assert not [n for n in names if "lora_" in n or "base_layer" in n]


def test_hf_restores_train_mode(hf_engine):
    hf_engine.model.train()
    hf_engine.generate([_chat("Hi")], SamplingSpec(max_new_tokens=2))
    assert hf_engine.model.training
    hf_engine.model.eval()


# ------------------------------------------------------------------------------------------------ vLLM backend
def _vllm_available() -> bool:
    from lanpo_core.rollout.vllm import vllm_status

    return vllm_status()[0]


def _vllm_config(dtype: str = "float32") -> RunConfig:
    cfg = RunConfig()
    cfg.rollout.backend = "vllm"
    cfg.rollout.vllm.dtype = dtype
    cfg.rollout.vllm.max_model_len = 512
    cfg.rollout.vllm.cpu_kv_cache_gib = 1
    cfg.rollout.max_prompt_tokens = 256
    return cfg


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_CRASH_SCRIPT = """
import json, sys, time
sys.path.insert(0, {repo!r})
if __name__ == "__main__":
    from lanpo_core.rollout import make_engine
    from lanpo_core.config import RunConfig
    cfg = RunConfig()
    cfg.rollout.backend = "vllm"
    cfg.rollout.vllm.max_model_len = 256
    cfg.rollout.vllm.cpu_kv_cache_gib = 1
    engine = make_engine(cfg, {path!r})
    engine.sync_from(__import__("transformers").AutoModelForCausalLM.from_pretrained({path!r}))
    (engine.sync_dir / "in-use").write_text("x")
    print("LANPO_PIDS", json.dumps([engine.pids, str(engine.sync_dir)]), flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_vllm_processes_die_with_a_crashed_caller(tmp_path, smollm2_path):
    """The caller is SIGKILLed (no close, no atexit): the watchdog must take the engine processes down with it."""
    import psutil

    if not _vllm_available():
        pytest.skip("vLLM not usable here")
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(_CRASH_SCRIPT.format(repo=os.getcwd(), path=smollm2_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        for line in proc.stdout:  # vLLM logs to stdout too
            if line.startswith("LANPO_PIDS "):
                break
        else:
            pytest.fail("the engine did not start in the child")
        pids, sync_dir = json.loads(line.split(" ", 1)[1])
        assert os.path.isdir(sync_dir)
        assert len(pids) >= 2
        assert all(psutil.pid_exists(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        alive = pids
        while alive and time.time() < deadline:
            time.sleep(0.5)
            alive = [p for p in pids if _running(p)]
        assert not alive, f"engine processes {alive} outlived their caller"
        assert not os.path.exists(sync_dir), "the weight-sync folder outlived the caller"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def vllm_engine(smollm2_path):
    if not _vllm_available():
        pytest.skip("vLLM not usable here")
    engine = make_engine(_vllm_config(), smollm2_path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ref_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_vllm_raw_logprobs_match_a_forward_pass(vllm_engine, ref_model):
    assert vllm_engine.backend == "vllm"
    assert vllm_engine.logprobs_mode == "raw"
    out = vllm_engine.generate(_arith([(3, 4), (5, 2), (1, 8)], n=3), SamplingSpec(temperature=0.7, max_new_tokens=12))
    assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(3)]
    _check_raw_logprobs(ref_model, out)


@pytest.mark.slow
def test_vllm_seeded_per_request(vllm_engine):
    reqs = _arith([(2, 3), (4, 4), (6, 1)], n=3)
    s = SamplingSpec(temperature=1.0, max_new_tokens=10, seed=9)
    a = vllm_engine.generate(reqs, s)
    b = vllm_engine.generate(reqs, s)
    alone = vllm_engine.generate(reqs[:1], s)  # same request (and position), smaller batch: same samples
    other = vllm_engine.generate(reqs, SamplingSpec(temperature=1.0, max_new_tokens=10, seed=10))
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert [c.completion_ids for c in alone] == [c.completion_ids for c in a[:3]]
    assert [c.completion_ids for c in a] != [c.completion_ids for c in other]
    assert len({tuple(c.completion_ids) for c in a[:3]}) > 1  # n samples of one request differ
    # without log-probs (evaluation) the samples are the same, and none are recorded
    bare = vllm_engine.generate(reqs, replace(s, logprobs=False))
    assert [c.completion_ids for c in bare] == [c.completion_ids for c in a]
    assert [c.logprobs for c in bare] == [[]] * len(bare)


@pytest.mark.slow
def test_vllm_a_named_stream_gives_the_same_samples_whatever_the_call(vllm_engine):
    """Common random numbers: LANPO asks for 2 plain samples among other requests, GRPO for 4 alone; with the same
    stream the 2 are the first 2 of the 4."""
    s = SamplingSpec(temperature=1.0, max_new_tokens=10, seed=5)
    plain = _chat("What is 7 + 6?")
    lanpo = vllm_engine.generate([_chat("Earlier attempt: 12. What is 7 + 6?", n=2),
                                  RolloutRequest(messages=plain.messages, n=2, stream=77)], s)
    grpo = vllm_engine.generate([RolloutRequest(messages=plain.messages, n=4, stream=77)], s)
    unnamed = vllm_engine.generate([RolloutRequest(messages=plain.messages, n=4)], s)  # stream = position 0
    assert [c.completion_ids for c in lanpo[2:]] == [c.completion_ids for c in grpo[:2]]
    assert [c.completion_ids for c in unnamed] != [c.completion_ids for c in grpo]
    with pytest.raises(RolloutError, match="stream"):
        RolloutRequest(messages=plain.messages, stream=-1)


@pytest.mark.slow
def test_vllm_seeded_batch_larger_than_the_token_budget(vllm_engine):
    # 48 distinct prompts of ~150 tokens (> the 4,096-token step budget): with chunked prefill on, the CPU engine
    # died rewinding a seeded generator of the prompt cut at the budget.
    filler = " ".join(f"item{k}" for k in range(60))
    reqs = [RolloutRequest(messages=[{"role": "user", "content": f"Problem {i}: {filler}. What is {i} + 1?"}], n=2)
            for i in range(48)]
    s = SamplingSpec(temperature=1.0, max_new_tokens=4, seed=3)
    out = vllm_engine.generate(reqs, s)
    assert sum(len(c.prompt_ids) for c in out[::2]) > 4096
    assert len(out) == 96
    assert all(c.completion_ids for c in out)
    assert [c.completion_ids for c in vllm_engine.generate(reqs[:2], s)] == [c.completion_ids for c in out[:4]]


@pytest.mark.slow
def test_vllm_finish_reasons_and_greedy_n(vllm_engine):
    eos = vllm_engine.tokenizer.eos_token_id
    short_a, short_b, long_ = vllm_engine.generate(
        [_chat("What is 2+2? Answer with only the number.", n=2), _chat("Write a long story about a dragon.")],
        SamplingSpec(temperature=0, max_new_tokens=24))
    assert short_a.completion_ids == short_b.completion_ids  # greedy n=2: identical copies
    assert short_a.finish_reason == "stop"
    assert short_a.completion_ids[-1] == eos
    assert long_.finish_reason == "length"
    assert len(long_.completion_ids) == 24
    stop = long_.text[20:26]
    cut = vllm_engine.generate([_chat("Write a long story about a dragon.")],
                               SamplingSpec(temperature=0, max_new_tokens=24, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.stop_string == stop
    assert cut.text == long_.text[: long_.text.index(stop)]
    assert cut.completion_ids == long_.completion_ids[: len(cut.completion_ids)]


@pytest.mark.slow
def test_vllm_weight_sync_in_place(vllm_engine, ref_model):
    greedy = SamplingSpec(temperature=0, max_new_tokens=8)
    req = [_chat("What is the capital of France?")]
    pids = list(vllm_engine.pids)
    before = vllm_engine.generate(req, greedy)[0]
    with torch.no_grad():
        saved = {n: p.clone() for n, p in ref_model.named_parameters() if "down_proj" in n}
        for n in saved:
            ref_model.get_parameter(n).zero_()
    try:
        secs = vllm_engine.sync_from(ref_model)
        broken = vllm_engine.generate(req, greedy)[0]
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                ref_model.get_parameter(n).copy_(v)
    assert broken.completion_ids != before.completion_ids
    assert broken.policy_version == before.policy_version + 1
    vllm_engine.sync_from(ref_model)
    again = vllm_engine.generate(req, greedy)[0]
    assert again.completion_ids == before.completion_ids  # prefix cache was reset: no stale KV from the old weights
    assert vllm_engine.sync_mode == "inplace"  # no engine re-creation
    assert vllm_engine.pids == pids
    assert not list(vllm_engine.sync_dir.iterdir())  # the weights file (RAM in /dev/shm) is freed after loading
    assert secs < 10  # ~1-2 s here; loose because the CPU is shared


@pytest.mark.slow
def test_vllm_close_leaves_no_process_behind(vllm_engine):
    import psutil

    pids = list(vllm_engine.pids)
    assert pids
    vllm_engine.close()
    vllm_engine.close()  # idempotent
    children = psutil.Process().children(recursive=True)
    assert not [p.pid for p in children if p.pid in pids or "VLLM" in p.name()], "left in our process tree"
    assert not [p for p in pids if _running(p)], "engine processes survived close()"
    assert not vllm_engine.sync_dir.exists()
    with pytest.raises(RuntimeError, match="closed"):
        vllm_engine.generate(_arith([(1, 1)]), SamplingSpec())
