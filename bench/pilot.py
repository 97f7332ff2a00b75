"""Task pilot for the LANPO-vs-GRPO experiment: which procedural arithmetic family leaves the bundled 135M model
headroom?

    .venv/bin/python bench/pilot.py [--problems 128] [--g 4] [--out bench/results/pilot.json]

For each candidate family (`FAMILIES`), the base model of configs/tiny-cpu.yaml answers `--problems` training
problems: one greedy answer and G samples at the training temperature, through the rollout engine and verifier of
a training step. Printed per family: greedy accuracy, mean@G, the share of G-groups with mixed rewards (the groups
that give GRPO a gradient), and the tokens per answer. The experiment wants mean@G between about 10 % and 40 % and
most groups mixed (docs/results.md, "The task").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES: dict[str, dict] = {
    "1d+-1d": {"operations": ["+", "-"]},
    "1-2d+-1-2d": {"operations": ["+", "-"], "min_digits": 1, "max_digits": 2},
    "2d+-1d": {"operations": ["+", "-"], "operand_ranges": [[10, 99], [0, 9]]},
    "1d+-1d+-1d": {"operations": ["+", "-"], "operand_ranges": [[0, 9]] * 3},
    "1d+-x1d": {"operations": ["+", "-", "*"]},
    "0-20+-0-20": {"operations": ["+", "-"], "operand_ranges": [[0, 20]] * 2},
    "0-25+-0-25": {"operations": ["+", "-"], "operand_ranges": [[0, 25]] * 2},
    "0-30+-0-9": {"operations": ["+", "-"], "operand_ranges": [[0, 30], [0, 9]]},
    "0-15+-x0-15": {"operations": ["+", "-", "*"], "operand_ranges": [[0, 15]] * 2},
    "0-18+-x0-18": {"operations": ["+", "-", "*"], "operand_ranges": [[0, 18]] * 2},
    "0-20+-x0-20": {"operations": ["+", "-", "*"], "operand_ranges": [[0, 20]] * 2},
    "0-12+-0-12+-0-9": {"operations": ["+", "-"], "operand_ranges": [[0, 12], [0, 12], [0, 9]]},
}


def measure(engine, verifier, cfg, family: dict, problems: int, g: int, seed: int) -> dict:
    from lanpo_core.config import ArithmeticConfig
    from lanpo_core.data import generate_arithmetic
    from lanpo_core.feedback import solve_messages
    from lanpo_core.rollout import RolloutRequest, SamplingSpec

    items = generate_arithmetic(ArithmeticConfig(**family, seed=0), "train", problems).problems
    by_id = {p.id: p for p in items}
    started = time.perf_counter()
    out: dict[str, list] = {}
    for mode, n, temperature in (("greedy", 1, 0.0), ("sampled", g, cfg.rollout.temperature)):
        spec = SamplingSpec(temperature=temperature, top_p=1.0 if temperature == 0 else cfg.rollout.top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens, seed=seed, logprobs=False)
        requests = [RolloutRequest(messages=solve_messages(p.question, cfg.prompts), n=n, tags={"problem_id": p.id})
                    for p in items]
        completions = engine.generate(requests, spec)
        scores = verifier.score_batch((c.text, by_id[c.tags["problem_id"]].answer) for c in completions)
        out[mode] = [(c.tags["problem_id"], s.reward or 0.0, len(c.completion_ids)) for c, s in zip(completions, scores)]
    groups: dict[str, list[float]] = {}
    for pid, r, _ in out["sampled"]:
        groups.setdefault(pid, []).append(r)
    mixed = sum(0 < statistics.fmean(rs) < 1 for rs in groups.values())
    return {
        "family": family, "problems": len(items),
        "greedy": statistics.fmean(r for _, r, _ in out["greedy"]),
        "mean_at_g": statistics.fmean(r for _, r, _ in out["sampled"]),
        "mixed_groups": mixed / len(groups),
        "problems_never_solved": sum(max(rs) == 0 for rs in groups.values()) / len(groups),
        "tokens_per_answer": statistics.fmean(t for _, _, t in out["sampled"]),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pilot.json"))
    args = ap.parse_args()
    from lanpo_core.config import load_config
    from lanpo_core.hardware import cpu_name
    from lanpo_core.rollout import make_engine
    from lanpo_core.verify import Verifier

    cfg = load_config(args.config, [f"seed={args.seed}"])
    results = {}
    with make_engine(cfg) as engine, Verifier.from_config(cfg.verify) as verifier:
        print(f"{'family':<14} {'greedy':>6} {'mean@' + str(args.g):>7} {'mixed':>6} {'never':>6} {'tokens':>6} {'s':>5}")
        for name in args.families.split(","):
            r = results[name] = measure(engine, verifier, cfg, FAMILIES[name], args.problems, args.g, args.seed)
            print(f"{name:<14} {r['greedy']:>6.3f} {r['mean_at_g']:>7.3f} {r['mixed_groups']:>6.3f} "
                  f"{r['problems_never_solved']:>6.3f} {r['tokens_per_answer']:>6.1f} {r['seconds']:>5.0f}", flush=True)
    payload = {"cpu": cpu_name(), "config": args.config, "g": args.g, "temperature": cfg.rollout.temperature,
               "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
