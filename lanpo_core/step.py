"""One LANPO step, stage by stage, and `train(cfg)`: a whole LANPO (or plain GRPO) run without Prefect.

A step, in the order of METHOD.md (each stage is a function of explicit inputs returning plain data and metrics):

    problems = problems_for_step(train_problems, step, B, seed)          # the B problems of step t
    feedback = build_feedback(rt, problems, step, policy)                # reflection + abstraction contexts
    completions = generate(rt, problems, feedback, step, policy)          # G rollouts per problem, by the mix
    rollouts = score(rt, problems, completions, policy)                  # math-verify rewards
    pool_version = write_pool(rt, problems, rollouts, feedback, step)     # rollouts + new lessons, one version
    policy = update(rt, problems, rollouts, policy)                      # GRPO update from the reward alone

How it departs from textbook GRPO (all G rollouts of a group sampled from the same plain prompt):
- A group is G rollouts of one problem of every kind: plain, reflection (the problem with the model's own earlier
  attempts, reward-free) and abstraction (with lessons distilled from similar other problems), split by
  `lanpo.rollout_mix`. A context kind with no context for the problem (no earlier attempt, no relevant experience,
  or the leakage guard dropped it) falls back to plain; the realised mix is logged.
- The baseline is shared: advantages are taken over the whole mixed group (lanpo_core/loss.py).
- Context-conditioned rollouts are trained under the plain prompt by default (`lanpo.train_prompt`), with an
  off-policy weight and negatives dropped (`lanpo.offpolicy`; docs/update.md).
- Groups whose gold answer is unusable are not trained (counted as `update/unusable_groups`).

`Rollout` is plain data (ints, strings, lists) so that a Prefect task can persist it and a resumed flow can read it
back without any model around.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig
from .feedback import FeedbackBatch, FeedbackBuilder, engine_abstractor, feedback_kinds, solve_messages
from .pool import RolloutRecord
from .rollout import Completion, RolloutRequest, SamplingSpec, render_prompt
from .runtime import PolicyRef, Runtime, load_train_problems
from .update import RolloutSample, training_prompt_ids
from .verify import Verifier

log = logging.getLogger(__name__)

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
        plain, with_context = counts["plain"], []
        for kind in ("reflection", "abstraction"):
            n = counts[kind]
            context = feedback.get(p.id, kind) if feedback is not None and n else None
            if n and context is None:
                plain += n
                plan.fallbacks[kind] += n
            elif n:
                with_context.append(RolloutRequest(messages=context.messages, n=n, stream=sampling_stream(p.id, kind),
                                                   tags={"problem_id": p.id, "kind": kind,
                                                         "context_ids": list(context.source_ids)}))
                plan.mix[kind] += n
        if plain:  # plain first: rollout indices 0..plain-1 of the group are the plain ones
            plan.requests.append(RolloutRequest(messages=solve_messages(p.question, cfg.prompts), n=plain,
                                                stream=sampling_stream(p.id, "plain"),
                                                tags={"problem_id": p.id, "kind": "plain", "context_ids": []}))
            plan.mix["plain"] += plain
        plan.requests += with_context
    return plan


def sampling_stream(problem_id: str, kind: str) -> int:
    """The random stream of a problem's rollouts of one kind. Named by the problem, not by the request's position,
    so that LANPO's plain rollouts and GRPO's draw the same samples at the same step and weights (common random
    numbers: LANPO sends three requests per problem where GRPO sends one)."""
    return int.from_bytes(hashlib.sha256(f"{kind}|{problem_id}".encode()).digest()[:4], "big") >> 1


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
        out[p.id] = render_prompt(tokenizer, request, cfg.rollout.max_prompt_tokens).ids
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
    out[f"{prefix}prompt_tokens"] = float(sum(len(r.prompt_ids) for r in rollouts))  # context costs prompt tokens
    out[f"{prefix}finish_length"] = float(sum(r.finish_reason == "length" for r in rollouts))
    return out


def eval_due(step: int, cfg: RunConfig) -> bool:
    """Evaluate after step `step` (0-based): every `eval.every` steps and after the last."""
    last = step == cfg.grpo.steps - 1
    return last or (cfg.eval.every > 0 and (step + 1) % cfg.eval.every == 0)


# ------------------------------------------------------------------------------------------------ the stages
Metrics = dict[str, float]


def _abstractor(rt: Runtime, step: int):
    if rt.cfg.lanpo.abstraction.abstractor == "extractive":
        return None
    return engine_abstractor(rt.abstractor_engine, rt.cfg, step)


def build_feedback(rt: Runtime, problems: Sequence[Any], step: int, policy: PolicyRef
                   ) -> tuple[FeedbackBatch, Metrics]:
    """Reflection and abstraction contexts for the step's problems, from the pool, audited by the leakage guard."""
    cfg = rt.cfg
    kinds = feedback_kinds(cfg)
    if not kinds:
        return FeedbackBatch(), {}
    if "abstraction" in kinds and cfg.lanpo.abstraction.abstractor == "policy":
        rt.ensure_policy(policy)  # lessons are written by the current policy
    abstractor = _abstractor(rt, step)
    builder = FeedbackBuilder(rt.pool, cfg.lanpo, cfg.prompts, abstractor, extraction=cfg.verify.extraction,
                              seed=cfg.seed)
    batch, metrics = FeedbackBatch(), {}
    for kind in kinds:  # timed apart: abstraction pays for the abstractor's generation, reflection only for lookups
        started = time.perf_counter()
        batch.update(builder.build(problems, step, [kind], policy_version=policy.step))
        metrics[f"time/{kind}_seconds"] = time.perf_counter() - started
    metrics["feedback/abstractor_tokens"] = float(abstractor.tokens if abstractor else 0)
    metrics["feedback/abstractor_prompt_tokens"] = float(abstractor.prompt_tokens if abstractor else 0)
    return batch, {**batch.metrics(), **metrics}


def generate(rt: Runtime, problems: Sequence[Any], feedback: FeedbackBatch, step: int, policy: PolicyRef
             ) -> tuple[list[Completion], Metrics]:
    """G rollouts per problem from `policy`, split by the rollout mix."""
    rt.ensure_policy(policy)
    plan = plan_requests(problems, feedback, rt.cfg)
    started = time.perf_counter()
    completions = rt.engine.generate(plan.requests, SamplingSpec.from_config(rt.cfg, step=step))
    seconds = time.perf_counter() - started
    tokens = sum(len(c.completion_ids) for c in completions)
    # A prompt over `rollout.max_prompt_tokens` is refused whole: its rollouts are missing from the group (counted)
    refused = Counter(c.tags["kind"] for c in completions if c.finish_reason == "refused")
    return completions, {**plan.metrics(), **{f"mix/refused_{k}": float(refused[k]) for k in KINDS},
                         "time/generate_seconds": seconds, "rollout/tokens_per_second": tokens / max(seconds, 1e-9)}


def score(rt: Runtime, problems: Sequence[Any], completions: Sequence[Completion], policy: PolicyRef
          ) -> tuple[list[Rollout], Metrics]:
    """Verify every completion against its problem's gold answer."""
    started = time.perf_counter()
    rollouts = score_rollouts(completions, problems, rt.verifier, policy.step)
    return rollouts, {**rollout_metrics(rollouts), "time/verify_seconds": time.perf_counter() - started}


def write_pool(rt: Runtime, problems: Sequence[Any], rollouts: Sequence[Rollout], feedback: FeedbackBatch,
               step: int) -> tuple[int, Metrics]:
    """Append the step's rollouts and the lessons made for its contexts to the pool, as one version."""
    started = time.perf_counter()
    report = rt.pool.write_step(step, pool_records(rollouts, problems), lessons=feedback.lesson_sets())
    return report.version, {**report.as_metrics(), "pool/rows": rt.pool.count(),
                            "time/pool_seconds": time.perf_counter() - started}


def update(rt: Runtime, problems: Sequence[Any], rollouts: Sequence[Rollout], policy: PolicyRef
           ) -> tuple[PolicyRef, Metrics]:
    """One GRPO update of `policy` on the step's rollouts (reward only: no text of the feedback reaches the loss
    except through the responses themselves); returns the new policy and writes its checkpoint (in this process, or
    on the trainer of `update.placement: trainer`)."""
    samples, unusable = training_samples(rollouts, plain_prompt_ids(problems, rt.tokenizer, rt.cfg), rt.cfg)
    if not samples:
        log.warning("step %d: no usable rollout (every group unusable or refused); the update is skipped",
                    policy.step + 1)
    new, metrics = rt.apply_update(samples, policy)
    return new, {**metrics, "update/unusable_groups": float(unusable)}


def kind_summary(metrics: Metrics, prefix: str = "update/kind/") -> str:
    """One line of the per-kind update diagnostics (the flow logs it per step): per kind, trained rollouts, mean
    weight, ESS / n and weight mass (docs/update.md, "Per-kind diagnostics")."""
    kinds = sorted({key[len(prefix):].split("/")[0] for key in metrics if key.startswith(prefix)})
    return "; ".join(f"{k} n={metrics[f'{prefix}{k}/trained']:.0f} w={metrics[f'{prefix}{k}/weight_mean']:.3f} "
                     f"ess={metrics[f'{prefix}{k}/ess_frac']:.2f} mass={metrics[f'{prefix}{k}/weight_mass']:.3g}"
                     for k in kinds)


def evaluate(rt: Runtime, policy: PolicyRef) -> tuple[Metrics, list]:
    """Zero-shot accuracy of `policy` on the held-out benchmarks (and feedback-augmented with `eval.feedback`);
    the predictions are written to `<run_dir>/eval/step-<policy.step>.jsonl`."""
    from .evaluate import evaluate_with_feedback, evaluate_zero_shot

    rt.ensure_policy(policy)
    cfg = rt.cfg
    started = time.perf_counter()
    metrics, predictions = evaluate_zero_shot(rt.engine, rt.eval_problems, cfg, rt.verifier, seed=cfg.seed)
    metrics["time/eval_seconds"] = time.perf_counter() - started
    if cfg.eval.feedback:
        started = time.perf_counter()
        builder = FeedbackBuilder(rt.pool, cfg.lanpo, cfg.prompts, _abstractor(rt, policy.step),
                                  extraction=cfg.verify.extraction, seed=cfg.seed)
        more, feedback_predictions = evaluate_with_feedback(rt.engine, rt.eval_problems, cfg, rt.verifier, builder,
                                                            seed=cfg.seed)
        metrics.update(more)
        predictions += feedback_predictions
        metrics["time/eval_feedback_seconds"] = time.perf_counter() - started
    path = predictions_path(rt.run_dir, policy.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for p in predictions:
            handle.write(json.dumps(p.as_dict()) + "\n")
    return metrics, predictions


def predictions_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step-{step:05d}.jsonl"


# ------------------------------------------------------------------------------------------------ a whole run
def train(cfg: RunConfig, run_dir: str | Path, log: Any = None) -> dict[str, Any]:
    """Run `cfg` from the base model to its last step in this process, without Prefect or MLflow.

    `log(metrics, step)`, if given, receives every stage's metrics, by the step counted from 1 as the flow logs them
    to MLflow (a step's stages and the evaluation of the policy it makes at that step; the base policy's at 0).
    Returns the final policy, pool version and evaluations (`eval_before` with `eval.at_start`). The same config
    gives the same checkpoint as the flow.
    """
    log = log or (lambda metrics, step: None)
    rt = Runtime(cfg, run_dir)
    train_problems = load_train_problems(cfg)
    policy, pool_version, out = PolicyRef.base(cfg), 0, {}
    try:
        if cfg.eval.at_start:
            out["eval_before"], _ = evaluate(rt, policy)
            log(out["eval_before"], 0)
        for step in range(cfg.grpo.steps):
            problems = problems_for_step(train_problems, step, cfg.rollout.batch_problems, cfg.seed)
            feedback, m1 = build_feedback(rt, problems, step, policy)
            completions, m2 = generate(rt, problems, feedback, step, policy)
            rollouts, m3 = score(rt, problems, completions, policy)
            pool_version, m4 = write_pool(rt, problems, rollouts, feedback, step)
            policy, m5 = update(rt, problems, rollouts, policy)
            log({**m1, **m2, **m3, **m4, **m5}, step + 1)
            if eval_due(step, cfg):
                out["eval"], _ = evaluate(rt, policy)
                log(out["eval"], policy.step)
    finally:
        rt.close()  # waits for the last checkpoint write
    return {"steps": policy.step, "checkpoint": policy.path, "checkpoint_checksum": policy.checksum,
            "pool_version": pool_version, **out}
