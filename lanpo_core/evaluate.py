"""Evaluation (METHOD.md step 9) on held-out benchmarks.

Zero-shot (the headline): plain prompt, no pool. For each benchmark: mean@k (k = `eval.samples` samples per problem
at `eval.temperature`, accuracy averaged over all samples; named `mean_at_k` whatever k, so that runs with different
k share the metric and k is read from the run's `eval.samples`) and, with `eval.greedy`, greedy pass@1.

Feedback-augmented (secondary, `eval.feedback`): greedy pass@1 with the abstraction prompt, whose lessons come from
experiences of the *training* pool similar to the test problem, made by the run's abstractor. The pool is only read:
new lessons are not stored, and test problems are never written to it. A test problem never sees itself: its pool
neighbours exclude its own id (test ids are prefixed `eval/<benchmark>/`), identical normalised text and
near-duplicates (`abstraction.duplicate_similarity`), exactly as in training. A problem with no relevant experience,
or whose context the leakage guard drops, is answered with the plain prompt, as a training rollout would be; the
fraction that really had lessons is reported as `feedback_coverage`.

Problems whose gold answer is unusable are left out of the denominators and counted. Breakdowns by `subject` and
`level` where the problems carry them (MATH-500). Every prediction is returned with its question, gold answer,
extracted answer and status, so any number here can be recomputed (and read) from the saved predictions
(`accuracy_from_predictions`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from .config import RunConfig
from .feedback import FeedbackBuilder, solve_messages
from .rollout import RolloutEngine, RolloutRequest, SamplingSpec
from .verify import Verifier


@dataclass
class Prediction:
    benchmark: str
    problem_id: str
    question: str
    gold: str
    mode: str
    """`sampled`, `greedy` or `feedback_greedy`."""
    sample: int
    response: str
    extracted: str | None
    status: str
    reward: float | None
    subject: str | None = None
    level: str | None = None
    context: bool = False
    """The prompt carried lessons (feedback mode; False when the problem fell back to the plain prompt)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_zero_shot(engine: RolloutEngine, benchmarks: dict[str, Sequence[Any]], cfg: RunConfig,
                       verifier: Verifier, seed: int = 0) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics `eval/<benchmark>/mean_at_k`, `eval/<benchmark>/greedy`, breakdowns, and all predictions."""
    ev = cfg.eval
    predictions: list[Prediction] = []
    modes = [("sampled", ev.samples, ev.temperature)] + ([("greedy", 1, 0.0)] if ev.greedy else [])
    for name, problems in benchmarks.items():
        problems = _limited(problems, ev.limit)
        for mode, n, temperature in modes:
            sampling = SamplingSpec.from_config(cfg, seed=seed, temperature=temperature,
                                                max_new_tokens=ev.max_new_tokens, logprobs=False)
            requests = [RolloutRequest(messages=solve_messages(p.question, cfg.prompts), n=n,
                                       tags={"problem_id": p.id}) for p in problems]
            completions = engine.generate(requests, sampling)
            by_id = {p.id: p for p in problems}
            scores = verifier.score_batch((c.text, by_id[c.tags["problem_id"]].answer) for c in completions)
            for c, s in zip(completions, scores):
                p = by_id[c.tags["problem_id"]]
                predictions.append(Prediction(name, p.id, p.question, p.answer, mode, c.sample_index, c.text,
                                              s.extracted, s.status, s.reward, _opt(p.metadata.get("subject")),
                                              _opt(p.metadata.get("level"))))
    return accuracy_from_predictions(predictions), predictions


def evaluate_with_feedback(engine: RolloutEngine, benchmarks: dict[str, Sequence[Any]], cfg: RunConfig,
                           verifier: Verifier, builder: FeedbackBuilder,
                           seed: int = 0) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics `eval/<benchmark>/feedback_greedy` and `/feedback_coverage`, guard counts, and all predictions.

    `builder` reads the training pool and carries the abstractor; the lessons it makes are used, never stored.
    """
    ev = cfg.eval
    predictions: list[Prediction] = []
    stats: dict[str, float] = {}
    sampling = SamplingSpec.from_config(cfg, seed=seed, temperature=0.0, max_new_tokens=ev.max_new_tokens,
                                        logprobs=False)
    for name, problems in benchmarks.items():
        problems = [replace(p, id=f"eval/{name}/{p.id}") for p in _limited(problems, ev.limit)]
        original = {p.id: p.id.removeprefix(f"eval/{name}/") for p in problems}
        batch = builder.abstraction(problems, step=None)
        requests = []
        for p in problems:
            context = batch.get(p.id, "abstraction")
            messages = context.messages if context else solve_messages(p.question, cfg.prompts)
            requests.append(RolloutRequest(messages=messages, n=1, tags={"problem_id": p.id, "context": bool(context)}))
        completions = engine.generate(requests, sampling)
        by_id = {p.id: p for p in problems}
        scores = verifier.score_batch((c.text, by_id[c.tags["problem_id"]].answer) for c in completions)
        for c, s in zip(completions, scores):
            p = by_id[c.tags["problem_id"]]
            predictions.append(Prediction(name, original[p.id], p.question, p.answer, "feedback_greedy", 0, c.text,
                                          s.extracted, s.status, s.reward, _opt(p.metadata.get("subject")),
                                          _opt(p.metadata.get("level")), context=bool(c.tags["context"])))
        for key, value in batch.metrics(f"eval/{name}/feedback/").items():
            stats[key] = value
    return {**accuracy_from_predictions(predictions), **stats}, predictions


def _limited(problems: Sequence[Any], limit: int | None) -> list[Any]:
    return list(problems)[:limit] if limit else list(problems)


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def accuracy_from_predictions(predictions: Sequence[Prediction | dict]) -> dict[str, float]:
    """Recompute every evaluation metric from predictions (objects or their dicts)."""
    rows = [p.as_dict() if isinstance(p, Prediction) else p for p in predictions]
    groups: dict[str, list[float]] = defaultdict(list)
    unusable: dict[str, set] = defaultdict(set)
    for r in rows:
        if r["reward"] is None:
            unusable[r["benchmark"]].add(r["problem_id"])
            continue
        label = "mean_at_k" if r["mode"] == "sampled" else r["mode"]
        if r["mode"] == "feedback_greedy":
            groups[f"eval/{r['benchmark']}/feedback_coverage"].append(1.0 if r.get("context") else 0.0)
        correct = 1.0 if r["status"] == "correct" else 0.0
        groups[f"eval/{r['benchmark']}/{label}"].append(correct)
        for key in ("subject", "level"):
            if r.get(key) is not None:
                groups[f"eval/{r['benchmark']}/{label}/{key}={r[key]}"].append(correct)
    out = {name: sum(v) / len(v) for name, v in groups.items()}
    for bench, ids in unusable.items():
        out[f"eval/{bench}/unusable_gold"] = float(len(ids))
    return out
