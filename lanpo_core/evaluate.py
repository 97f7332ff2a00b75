"""Zero-shot evaluation (METHOD.md step 9): plain prompt, no pool, on held-out benchmarks.

For each benchmark: mean@k (k = `eval.samples` samples per problem at `eval.temperature`, accuracy averaged over all
samples) and, with `eval.greedy`, greedy pass@1. Problems whose gold answer is unusable are left out of the
denominators and counted. Breakdowns by `subject` and `level` where the problems carry them (MATH-500).
Every prediction is returned with its extracted answer and status, so any number here can be recomputed from the
saved predictions (`accuracy_from_predictions`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .config import RunConfig
from .feedback import solve_messages
from .rollout import RolloutEngine, RolloutRequest, SamplingSpec
from .verify import Verifier


@dataclass
class Prediction:
    benchmark: str
    problem_id: str
    mode: str
    """`sampled` or `greedy`."""
    sample: int
    response: str
    extracted: str | None
    status: str
    reward: float | None
    subject: str | None = None
    level: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_zero_shot(engine: RolloutEngine, benchmarks: dict[str, Sequence[Any]], cfg: RunConfig,
                       verifier: Verifier, seed: int = 0) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics `eval/<benchmark>/mean_at_<k>`, `eval/<benchmark>/greedy`, breakdowns, and all predictions."""
    ev = cfg.eval
    predictions: list[Prediction] = []
    modes = [("sampled", ev.samples, ev.temperature)] + ([("greedy", 1, 0.0)] if ev.greedy else [])
    for name, problems in benchmarks.items():
        problems = list(problems)[: ev.limit] if ev.limit else list(problems)
        for mode, n, temperature in modes:
            sampling = SamplingSpec.from_config(cfg, seed=seed, temperature=temperature,
                                                max_new_tokens=ev.max_new_tokens)
            requests = [RolloutRequest(messages=solve_messages(p.question, cfg.prompts), n=n,
                                       tags={"problem_id": p.id}) for p in problems]
            completions = engine.generate(requests, sampling)
            by_id = {p.id: p for p in problems}
            scores = verifier.score_batch((c.text, by_id[c.tags["problem_id"]].answer) for c in completions)
            for c, s in zip(completions, scores):
                meta = by_id[c.tags["problem_id"]].metadata
                predictions.append(Prediction(name, c.tags["problem_id"], mode, c.sample_index, c.text, s.extracted,
                                              s.status, s.reward, _opt(meta.get("subject")), _opt(meta.get("level"))))
    return accuracy_from_predictions(predictions, ev.samples), predictions


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def accuracy_from_predictions(predictions: Sequence[Prediction | dict], k: int) -> dict[str, float]:
    """Recompute every evaluation metric from predictions (objects or their dicts)."""
    rows = [p.as_dict() if isinstance(p, Prediction) else p for p in predictions]
    groups: dict[str, list[float]] = defaultdict(list)
    unusable: dict[str, set] = defaultdict(set)
    for r in rows:
        if r["reward"] is None:
            unusable[r["benchmark"]].add(r["problem_id"])
            continue
        label = f"mean_at_{k}" if r["mode"] == "sampled" else "greedy"
        correct = 1.0 if r["status"] == "correct" else 0.0
        groups[f"eval/{r['benchmark']}/{label}"].append(correct)
        for key in ("subject", "level"):
            if r.get(key) is not None:
                groups[f"eval/{r['benchmark']}/{label}/{key}={r[key]}"].append(correct)
    out = {name: sum(v) / len(v) for name, v in groups.items()}
    for bench, ids in unusable.items():
        out[f"eval/{bench}/unusable_gold"] = float(len(ids))
    return out
