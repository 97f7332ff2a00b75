"""The rollout interface and what every backend shares: requests, sampling, completions, prompt rendering, seeds.

Requests
    `RolloutRequest(messages=[...] | text="...", n=G, tags={...})`. Chat `messages` go through the tokenizer's chat
    template (`add_generation_prompt=True`); raw `text` is tokenised as is. Prompts are rendered here, on the
    caller's side, and backends receive token ids, so a backend never needs the model in-process to apply a template.

Over-long prompts (`rollout.max_prompt_tokens`, further capped so prompt + `max_new_tokens` fits the engine's context)
    are refused: not generated, but still answered with `n` placeholder completions with `finish_reason == "refused"`
    (empty ids), so results stay aligned with requests; logged (WARNING, with the request's tags) and counted in
    `engine.stats["prompts_refused"]`.

Log-probs (`Completion.logprobs[t]` belongs to `completion_ids[t]`), set per engine by `rollout.logprobs`:
    `raw`: log-softmax of the model's unmodified next-token logits (temperature 1, no top-k/top-p), the standard
    choice for importance ratios at temperature 1, what the GRPO update scores with at `grpo.logprob_temperature: 1`.
    `processed`: log-prob under the distribution the token was actually drawn from: logits / temperature, then top-k,
    then top-p, renormalised. `auto` (default) = raw when the trainer scores at temperature 1, else processed. Greedy
    decoding (temperature 0) gives T=1 log-probs either way. Values come from the engine's own forward pass, so they
    carry its dtype's numerics (bench/rollout.py compares bf16 vLLM with a float32 forward pass).

Sampling (`SamplingSpec`): temperature (0 = greedy), top_p, top_k (0 = off), max_new_tokens, stop strings, seed.
    Backends derive their per-batch or per-request seeds from `sampling.seed` with `derive_seed`.
    Stop strings: the text ends *before* the stop string; `completion_ids`/`logprobs` keep every sampled token up to
    the one that completed it. An EOS token that ends a completion is included in `completion_ids`.

Weight sync: `engine.sync_from(model)` (the trainer's transformers model, or a peft model: LoRA is merged on the fly)
    or `engine.load_weights(state_dict or iterable of (name, tensor))` with transformers checkpoint names. Each sync
    bumps `engine.policy_version`, stamped on every later completion.

Shutdown: `engine.close()` (idempotent; also `with make_engine(...) as engine:`) releases the engine.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

from ..config import RolloutConfig, RunConfig

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "refused"]


class RolloutError(ValueError):
    """A request or sampling setting is invalid (the message says which and why)."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (the message says why and how to fix it)."""


# ------------------------------------------------------------------------------------------------ data types
@dataclass
class RolloutRequest:
    """One prompt to sample `n` completions for."""

    messages: list[dict[str, Any]] | None = None
    """Chat messages (`{"role": ..., "content": str}`), rendered with the tokenizer's chat template."""
    text: str | None = None
    """Raw prompt text, used as is (no chat template). Exactly one of `messages` / `text`."""
    n: int = 1
    """Completions to sample."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Opaque labels copied to every completion (problem id, rollout kind, ...)."""
    stream: int | None = None
    """Names the request's random stream: under the same call seed, requests with the same stream draw the same
    samples (the first k of n), whatever else is in the call, on backends that seed each request (vLLM; the
    transformers backend seeds per batch). None: the request's position in the call."""

    def __post_init__(self) -> None:
        where = f"request {self.tags or ''}".strip()
        if self.stream is not None and (not isinstance(self.stream, int) or self.stream < 0):
            raise RolloutError(f"{where}: stream must be an integer >= 0 or None, got {self.stream!r}")
        if (self.messages is None) == (self.text is None):
            raise RolloutError(f"{where}: give exactly one of `messages` (chat) or `text` (raw prompt)")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise RolloutError(f"{where}: n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.tags, dict):
            raise RolloutError(f"{where}: tags must be a dict, got {type(self.tags).__name__}")
        if self.text is not None:
            if not isinstance(self.text, str) or not self.text.strip():
                raise RolloutError(f"{where}: text must be a non-empty string")
            return
        if not isinstance(self.messages, list) or not self.messages:
            raise RolloutError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RolloutError(f"{where}: messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        if not any(m["content"].strip() for m in self.messages):
            raise RolloutError(f"{where}: every message is empty")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. Build it from the config with `SamplingSpec.from_config`."""

    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling; 1 = off."""
    top_k: int = 0
    """Top-k; 0 = off."""
    max_new_tokens: int = 256
    """Most tokens generated per completion."""
    stop: tuple[str, ...] = ()
    """Stop strings (the completion text ends before the first one generated)."""
    seed: int | None = 0
    """Seed for this call; None = unseeded (not reproducible)."""
    logprobs: bool = True
    """Record each sampled token's log-prob. Evaluation turns it off: vLLM then skips computing them (5-15 % of
    its sampling time, docs/defaults.md) and `Completion.logprobs` may be empty."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise RolloutError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise RolloutError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RolloutError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RolloutError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RolloutError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise RolloutError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, config: RunConfig | RolloutConfig, *, step: int | None = None, seed: int | None = None,
                    **overrides: Any) -> "SamplingSpec":
        """Sampling settings of `config.rollout`. The seed is `seed` if given, else derived from the run seed and
        `step` (so every training step samples fresh but reproducibly). `overrides` replace single fields
        (e.g. `temperature=0` for greedy evaluation)."""
        rollout = config.rollout if isinstance(config, RunConfig) else config
        if seed is None:
            base = config.seed if isinstance(config, RunConfig) else 0
            seed = base if step is None else derive_seed(base, step)
        values = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                      max_new_tokens=rollout.max_new_tokens, stop=(), seed=seed, logprobs=True)
        unknown = set(overrides) - set(values)
        if unknown:
            raise RolloutError(f"unknown sampling fields {sorted(unknown)}; known: {sorted(values)}")
        values.update(overrides)
        return cls(**values)


@dataclass
class Completion:
    """One sampled completion."""

    request_index: int
    """Position of its request in the `generate` call."""
    sample_index: int
    """0..n-1 within its request."""
    tags: dict[str, Any]
    """The request's tags (a copy)."""
    text: str
    """Decoded completion, special tokens skipped, ending before a stop string."""
    prompt_ids: list[int]
    """Token ids of the prompt actually used (after templating)."""
    completion_ids: list[int]
    """Sampled token ids (a final EOS included)."""
    logprobs: list[float]
    """Log-prob of each sampled token (`rollout.logprobs` says which distribution; see the module doc); may be
    empty when the request's `SamplingSpec.logprobs` is False."""
    finish_reason: FinishReason
    """`stop` (EOS or stop string), `length` (max_new_tokens hit) or `refused` (over-long prompt, nothing generated)."""
    stop_string: str | None = None
    """The stop string that ended it, if any."""
    seconds: float = 0.0
    """Wall time of the generation batch this completion came from (shared by the batch)."""
    policy_version: int = 0
    """Number of weight syncs the engine had received when it generated this."""

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the pipeline calls. Every backend implements it."""

    backend: str
    tokenizer: Any
    policy_version: int
    logprobs_mode: str
    stats: dict[str, float]

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Completion]:
        """Completions for all requests, ordered by (request_index, sample_index)."""

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> float:
        """Serve these weights (transformers checkpoint names) from now on; returns seconds taken."""

    def sync_from(self, model: Any) -> float:
        """Serve the weights of the trainer's model (transformers or peft) from now on; returns seconds taken."""

    def close(self) -> None:
        """Release the engine (idempotent)."""

    def __enter__(self) -> "RolloutEngine": ...

    def __exit__(self, *exc: Any) -> None: ...


# ------------------------------------------------------------------------------------------------ prompts and seeds
@dataclass
class RenderedPrompt:
    ids: list[int]
    refused: bool = False
    reason: str = ""


def _encode(tokenizer: Any, request: RolloutRequest) -> list[int]:
    if request.messages is not None:
        out = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if isinstance(out, Mapping):  # some tokenizers return a BatchEncoding regardless
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(request.text, add_special_tokens=True)["input_ids"]]


def render_prompt(tokenizer: Any, request: RolloutRequest, max_prompt_tokens: int) -> RenderedPrompt:
    """Token ids of a request's prompt, refused when longer than `max_prompt_tokens`. Public so the trainer can
    render a prompt exactly the way the engine does."""
    ids = _encode(tokenizer, request)
    if len(ids) <= max_prompt_tokens:
        return RenderedPrompt(ids)
    return RenderedPrompt(ids, refused=True, reason=f"prompt has {len(ids)} tokens > limit {max_prompt_tokens}")


def request_seed(sampling: SamplingSpec, request: RolloutRequest, index: int) -> int | None:
    """A request's own seed: from the call seed and its stream (default: its position in the call)."""
    if sampling.seed is None:
        return None
    return derive_seed(sampling.seed, index if request.stream is None else request.stream)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (splitmix64-style), stable across runs and platforms: (run seed, step),
    (call seed, batch) or (call seed, request index) -> an independent seed."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFF


def eos_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's EOS id(s); empty when it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}


def iter_model_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of a transformers model in checkpoint naming, for `load_weights`.

    A peft model is merged on the fly: its LoRA deltas are added into the base weights while the tensors are copied,
    then removed again (peft `merge_adapter`/`unmerge_adapter`), so the engine serves the adapted policy in full. Tied
    weights are yielded once. Tensors are detached; consume the iterator before the model changes again."""
    import torch

    merged = False
    inner = model
    if hasattr(model, "merge_adapter") and hasattr(model, "get_base_model"):
        model.merge_adapter()
        merged = True
        inner = model.get_base_model()
    try:
        seen: set[int] = set()
        with torch.no_grad():
            for name, tensor in inner.state_dict().items():
                if merged:  # peft names -> checkpoint names; trained `modules_to_save` copies replace the originals
                    if "lora_" in name or ".original_module." in name:
                        continue
                    name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                ptr = tensor.data_ptr()
                if ptr in seen:
                    continue
                seen.add(ptr)
                yield name, tensor.detach()
    finally:
        if merged:
            model.unmerge_adapter()


# ------------------------------------------------------------------------------------------------ shared engine logic
class EngineBase:
    """Request validation, prompt rendering, refusals, stop handling, bookkeeping: everything but generation and
    weight loading, which a backend implements in `_generate_rows` and `_load_weights` (the engine may run in this
    process or behind a server)."""

    backend = "base"

    def __init__(self, tokenizer: Any, *, max_prompt_tokens: int, context_len: int, logprobs_mode: str,
                 progress: bool) -> None:
        if logprobs_mode not in ("raw", "processed"):
            raise RolloutError(f"logprobs mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.context_len = context_len
        self.logprobs_mode = logprobs_mode
        self.progress = progress
        self.policy_version = 0
        self.closed = False
        self.stats: dict[str, float] = dict(
            requests=0, sequences=0, generated_tokens=0, generate_seconds=0.0, prompts_refused=0, syncs=0,
            last_sync_seconds=0.0, total_sync_seconds=0.0)

    # -- public
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Completion]:
        self._check_open()
        if isinstance(requests, RolloutRequest):
            requests = [requests]
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, RolloutRequest):
                raise RolloutError(f"requests[{i}] is a {type(r).__name__}, expected RolloutRequest")
        if not isinstance(sampling, SamplingSpec):
            raise RolloutError(f"sampling must be a SamplingSpec, got {type(sampling).__name__}")
        if not requests:
            return []
        limit = min(self.max_prompt_tokens, self.context_len - sampling.max_new_tokens)
        if limit < 1:
            raise RolloutError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the "
                               f"engine's context of {self.context_len} tokens")
        rendered = []
        for i, r in enumerate(requests):
            rp = render_prompt(self.tokenizer, r, limit)
            if rp.refused:
                self.stats["prompts_refused"] += 1
                log.warning("refused request %d %s: %s", i, r.tags, rp.reason)
            rendered.append(rp)
        live = [i for i, rp in enumerate(rendered) if not rp.refused]
        started = time.perf_counter()
        rows = [(i, rendered[i].ids, requests[i].n, request_seed(sampling, requests[i], i)) for i in live]
        results = self._generate_rows(rows, sampling) if live else {}
        elapsed = time.perf_counter() - started
        out: list[Completion] = []
        for i, (r, rp) in enumerate(zip(requests, rendered)):
            for j in range(r.n):
                if rp.refused:
                    out.append(Completion(i, j, dict(r.tags), "", list(rp.ids), [], [], "refused",
                                          policy_version=self.policy_version))
                    continue
                ids, lps, reason, stop_str, secs = results[(i, j)]
                text, ids, lps, reason, stop_str = self._finish(ids, lps, reason, stop_str, sampling.stop)
                out.append(Completion(i, j, dict(r.tags), text, list(rp.ids), ids, lps, reason, stop_str,
                                      seconds=secs, policy_version=self.policy_version))
        n_tok = sum(len(c.completion_ids) for c in out)
        self.stats["requests"] += len(requests)
        self.stats["sequences"] += sum(r.n for r in requests)
        self.stats["generated_tokens"] += n_tok
        self.stats["generate_seconds"] += elapsed
        log.debug("%s: %d sequences, %d tokens in %.2fs (%.1f tok/s)", self.backend, len(out), n_tok, elapsed,
                  n_tok / max(elapsed, 1e-9))
        return out

    def sync_from(self, model: Any) -> float:
        self._check_open()
        return self.load_weights(iter_model_weights(model))

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> float:
        self._check_open()
        started = time.perf_counter()
        items = weights.items() if isinstance(weights, Mapping) else weights
        self._load_weights(items)
        secs = time.perf_counter() - started
        self.policy_version += 1
        self.stats["syncs"] += 1
        self.stats["last_sync_seconds"] = secs
        self.stats["total_sync_seconds"] += secs
        log.info("%s: weights synced in %.2fs (policy version %d)", self.backend, secs, self.policy_version)
        return secs

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- backend hooks
    def _generate_rows(self, rows: list[tuple[int, list[int], int, int | None]], sampling: SamplingSpec
                       ) -> dict[tuple[int, int], tuple[list[int], list[float], str, str | None, float]]:
        """rows: (request index, prompt ids, n, request seed or None) -> {(request index, sample index): (ids,
        logprobs, finish reason, stop string or None, seconds)}. Ids may run past a stop string; `_finish` cuts
        them."""
        raise NotImplementedError

    def _load_weights(self, items: Iterable[tuple[str, Any]]) -> None:
        raise NotImplementedError

    # -- helpers
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the {self.backend} rollout engine is closed")

    def _finish(self, ids: list[int], lps: list[float], reason: str, stop_str: str | None, stops: tuple[str, ...]
                ) -> tuple[str, list[int], list[float], FinishReason, str | None]:
        """Cut at the first EOS (kept) and the first stop string (ids up to the token completing it; text before it)."""
        eos = eos_token_ids(self.tokenizer)
        for t, tok in enumerate(ids):
            if tok in eos:
                ids, lps, reason = ids[: t + 1], lps[: t + 1], "stop"
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stops:
            hit = _first_stop(text, stops)
            if hit is not None:
                # smallest prefix whose text contains a stop string (monotone in the prefix length: bisect)
                lo, hi = 1, len(ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if _first_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is None:
                        lo = mid + 1
                    else:
                        hi = mid
                ids, lps = ids[:lo], lps[:lo]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                pos, stop_str = _first_stop(text, stops)  # type: ignore[misc]
                text, reason = text[:pos], "stop"
        return text, ids, [float(x) for x in lps], reason, stop_str  # type: ignore[return-value]


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    best = None
    for s in stops:
        k = text.find(s)
        if k >= 0 and (best is None or k < best[0]):
            best = (k, s)
    return best


def write_weights_file(items: Iterable[tuple[str, Any]], folder: Path, dtype: str) -> Path:
    """The weights as `folder/model.safetensors` in `dtype` (written to a temporary name, then renamed, so a reader
    never sees half a file); tied tensors once. Returns `folder`."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise RolloutError(f"weight {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        if t.data_ptr() in seen:  # tied weights: once is enough (safetensors refuses shared storage)
            continue
        seen.add(t.data_ptr())
        t = t.detach()
        if torch_dtype is not None and t.is_floating_point() and t.dtype != torch_dtype:
            t = t.to(torch_dtype)
        tensors[name] = t.contiguous()
    if not tensors:
        raise RolloutError("load_weights got no tensors")
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    return folder
