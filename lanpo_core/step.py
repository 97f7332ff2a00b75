"""The rollout side of one LANPO training step (METHOD.md steps 1, 2, 6, 7, and the hand-off to step 8).

    requests, mix = plan_requests(problems, feedback, cfg)             # group composition, with fallbacks
    completions = engine.generate(requests, SamplingSpec.from_config(cfg, step=step))
    rollouts = score_rollouts(completions, problems, verifier)          # math-verify rewards
    records = pool_records(rollouts, problems)                         # -> pool.write_step(step, records)
    samples = training_samples(rollouts, plain_prompt_ids, cfg)        # -> PolicyUpdater.step(samples)

Group composition: each problem's G rollouts split by `lanpo.rollout_mix` (largest remainder, so the kinds sum to G).
A context kind with no context for the problem (no earlier attempt, no relevant experience, or the leakage guard
dropped it) falls back to plain; the realised mix is returned for logging.

`Rollout` is plain data (ints, strings, lists) so that a Prefect task can persist it and a resumed flow can read it
back without any model around.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .config import RunConfig
from .feedback import FeedbackBatch, solve_messages
from .pool import RolloutRecord
from .rollout import Completion, RolloutRequest, render_prompt
from .update import RolloutSample, training_prompt_ids
from .verify import Verifier

KINDS = ("plain", "reflection", "abstraction")


@dataclass
class Rollout:
    """One scored rollout: what the pool stores and the update trains on."""

    problem_id: str
    kind: str
    """plain / reflection / abstraction (the kind actually used, after fallbacks)."""
    rollout_index: int
    """Position in the problem's group, 0..G-1."""
    context_ids: list[str]
    """Pool uids the context was built from (empty for plain)."""
    text: str
    prompt_ids: list[int]
    """The prompt it was sampled from (context included)."""
    completion_ids: list[int]
    logprobs: list[float]
    """Per-token sampling log-probs (rollout engine, raw by default)."""
    finish_reason: str
    policy_version: int
    reward: float | None = None
    """Verifier reward; None when the gold answer is unusable (the group is then not trained)."""
    status: str = ""
    extracted: str | None = None

    @property
    def context_conditioned(self) -> bool:
        return self.kind != "plain"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    requests: list[RolloutRequest]
    mix: Counter = field(default_factory=Counter)
    """Realised rollouts per kind."""
    fallbacks: Counter = field(default_factory=Counter)
    """Rollouts of a context kind that fell back to plain, by the kind they were meant to be."""

    def metrics(self, prefix: str = "mix/") -> dict[str, float]:
        out = {f"{prefix}{k}": float(self.mix[k]) for k in KINDS}
        out.update({f"{prefix}fallback_{k}": float(v) for k, v in self.fallbacks.items()})
        return out


def plan_requests(problems: Sequence[Any], feedback: FeedbackBatch | None, cfg: RunConfig) -> Plan:
    """One request per (problem, kind) with n = that kind's share of G."""
    counts = cfg.lanpo.rollout_mix.counts(cfg.rollout.num_generations)
    plan = Plan([])
    for p in problems:
        plain = counts["plain"]
        for kind in ("reflection", "abstraction"):
            n = counts[kind]
            context = feedback.get(p.id, kind) if feedback is not None and n else None
            if n and context is None:
                plain += n
                plan.fallbacks[kind] += n
            elif n:
                plan.requests.append(RolloutRequest(messages=context.messages, n=n, tags={
                    "problem_id": p.id, "kind": kind, "context_ids": list(context.source_ids)}))
                plan.mix[kind] += n
        if plain:
            plan.requests.append(RolloutRequest(messages=solve_messages(p.question, cfg.prompts), n=plain,
                                                tags={"problem_id": p.id, "kind": "plain", "context_ids": []}))
            plan.mix["plain"] += plain
    return plan


def score_rollouts(completions: Sequence[Completion], problems: Sequence[Any], verifier: Verifier,
                   policy_version: int) -> list[Rollout]:
    """Score completions against their problem's gold answer; number them within each group.

    Completions the engine refused (over-long prompt) are left out: they have no tokens to store or train on.
    `policy_version` is the number of updates behind the weights that generated them (the engine's own counter
    restarts with the process, so a resumed run would stamp different numbers).
    """
    gold = {p.id: p.answer for p in problems}
    kept = [c for c in completions if c.finish_reason != "refused"]
    scores = verifier.score_batch((c.text, gold[c.tags["problem_id"]]) for c in kept)
    index: Counter = Counter()
    out = []
    for c, s in zip(kept, scores):
        pid = c.tags["problem_id"]
        out.append(Rollout(pid, c.tags["kind"], index[pid], list(c.tags.get("context_ids", [])), c.text,
                           list(c.prompt_ids), list(c.completion_ids), list(c.logprobs), c.finish_reason,
                           policy_version, s.reward, s.status, s.extracted))
        index[pid] += 1
    return out


def pool_records(rollouts: Sequence[Rollout], problems: Sequence[Any]) -> list[RolloutRecord]:
    by_id = {p.id: p for p in problems}
    return [RolloutRecord.for_problem(by_id[r.problem_id], rollout_index=r.rollout_index, kind=r.kind,
                                      response=r.text, reward=r.reward, extracted_answer=r.extracted,
                                      context_ids=r.context_ids, policy_version=r.policy_version,
                                      prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.completion_ids))
            for r in rollouts]


def plain_prompt_ids(problems: Sequence[Any], tokenizer: Any, cfg: RunConfig) -> dict[str, list[int]]:
    """Token ids of each problem's plain solve prompt, rendered exactly as the rollout engine renders it."""
    out = {}
    for p in problems:
        request = RolloutRequest(messages=solve_messages(p.question, cfg.prompts))
        out[p.id] = render_prompt(tokenizer, request, cfg.rollout.max_prompt_tokens, cfg.rollout.overlong_prompt).ids
    return out


def training_samples(rollouts: Sequence[Rollout], plain_ids: dict[str, list[int]], cfg: RunConfig
                     ) -> tuple[list[RolloutSample], int]:
    """RolloutSamples for the update, and the number of groups left out because their gold answer is unusable."""
    unusable = {r.problem_id for r in rollouts if r.reward is None}
    samples = [
        RolloutSample(group_id=r.problem_id, kind=r.kind,
                      train_prompt_ids=training_prompt_ids(cfg.lanpo.train_prompt, plain_ids[r.problem_id],
                                                           r.prompt_ids, r.context_conditioned),
                      completion_ids=r.completion_ids, sampling_logprobs=r.logprobs, reward=float(r.reward),
                      context_conditioned=r.context_conditioned)
        for r in rollouts if r.problem_id not in unusable
    ]
    return samples, len(unusable)


def problems_for_step(problems: Sequence[Any], step: int, batch_size: int, seed: int) -> list[Any]:
    """The B problems of a step: epochs over a seeded shuffle (a new order each epoch), the same for LANPO and the
    GRPO baseline with the same seed."""
    import random

    if not problems:
        raise ValueError("no training problems")
    orders: dict[int, list[int]] = {}
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, len(problems))
        if epoch not in orders:
            orders[epoch] = list(range(len(problems)))
            random.Random(f"{seed}|epoch|{epoch}").shuffle(orders[epoch])
        out.append(problems[orders[epoch][pos]])
    return out


def rollout_metrics(rollouts: Sequence[Rollout], prefix: str = "rollout/") -> dict[str, float]:
    """Reward mean and counts per kind, statuses, tokens."""
    out: dict[str, float] = {}
    for kind in KINDS:
        rewards = [r.reward for r in rollouts if r.kind == kind and r.reward is not None]
        if rewards:
            out[f"{prefix}reward_{kind}"] = sum(rewards) / len(rewards)
    scored = [r.reward for r in rollouts if r.reward is not None]
    if scored:
        out[f"{prefix}reward_mean"] = sum(scored) / len(scored)
    for status, n in Counter(r.status for r in rollouts).items():
        out[f"{prefix}status_{status}"] = float(n)
    out[f"{prefix}completion_tokens"] = float(sum(len(r.completion_ids) for r in rollouts))
    out[f"{prefix}finish_length"] = float(sum(r.finish_reason == "length" for r in rollouts))
    return out
