"""Off-policy estimators on real LANPO rollouts (issue 12): how much of the update the context rollouts carry under
each `lanpo.offpolicy.correction`, at 48 new tokens on the tiny arithmetic task and at 256 on GSM8K.

    .venv/bin/python bench/offpolicy.py [--settings tiny,gsm8k] [--problems 16] [--out bench/results/offpolicy.json]

Per setting, with the real pipeline pieces of configs/tiny-cpu.yaml (bundled SmolLM2-135M-Instruct, its rollout
engine at T=0.7 with processed log-probs, the verifier, a LanceDB pool with MiniLM embeddings, the policy as
abstractor) and G=8 (4 plain, 2 reflection, 2 abstraction):
1. step 0: G rollouts per problem, scored and written to the pool (no context exists yet: all plain);
2. step 1 on the same problems: reflection shows each problem's step-0 attempts, abstraction the lessons of similar
   other problems; the rollouts are scored and turned into update samples;
3. `PolicyUpdater.offpolicy_diagnostics` scores every sample under its training prompt (the trainer's kernel and
   precision) and gives, per estimator and kind: mean weight and ESS / n over all context rollouts (`all`), and over
   the trained ones (`A > 0` under the default negative drop), the trained weight mass per positive-advantage
   rollout relative to the plain kind's (`mass/plain`), and the share of capped tokens.
The plain rollouts' own log-ratio (same prompt for sampling and training) is printed first: it should be ~0, and a
temperature or precision mismatch would show there before it shows in any estimator. The 135M model solves almost
no GSM8K problem and 16 random GSM8K problems are rarely similar, so the `gsm8k` setting shows abstraction lessons
from unsuccessful and unthresholded experiences (`successful_only: false`, `min_similarity: null`; otherwise no
abstraction context exists) and has few or no positive advantages: its `all` columns (the weights whatever the
advantage) are the figures to read there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = {
    "tiny": ["rollout.max_new_tokens=48"],
    "gsm8k": ["data.train.format=gsm8k", "data.train.path=${shared}/gsm8k/train.jsonl", "data.train.limit=200",
              "prompts.solve_instruction=Reason step by step, and put your final answer within \\boxed{}.",
              "rollout.max_new_tokens=256", "rollout.max_prompt_tokens=1536",
              "lanpo.abstraction.successful_only=false", "lanpo.abstraction.min_similarity=null"],
}
CONTEXT_KINDS = ("reflection", "abstraction")


def mass_vs_plain(figures: dict[str, dict[str, float]], kind: str) -> float | None:
    """The kind's trained weight mass per positive-advantage rollout over the plain kind's (None if either has no
    positive-advantage rollout)."""
    mine, plain = figures.get(kind, {}), figures.get("plain", {})
    if not mine.get("positive") or not plain.get("positive"):
        return None
    return (mine["positive_mass"] / mine["positive"]) / (plain["positive_mass"] / plain["positive"])


def measure(overrides: list[str], problems: int, run_dir: Path, base: str = "configs/tiny-cpu.yaml") -> dict:
    """Steps 1-3 above on `problems` problems; returns the diagnostics, rewards and timings as plain data."""
    from lanpo_core.config import load_config
    from lanpo_core.runtime import PolicyRef, Runtime, load_train_problems
    from lanpo_core.step import (build_feedback, generate, plain_prompt_ids, problems_for_step, score,
                                 training_samples, write_pool)

    cfg = load_config(REPO / base, [f"rollout.batch_problems={problems}", "rollout.num_generations=8",
                                    *overrides])
    rt = Runtime(cfg, run_dir)
    started = time.perf_counter()
    try:
        chosen = problems_for_step(load_train_problems(cfg), 0, problems, cfg.seed)
        policy = PolicyRef.base(cfg)
        rewards: dict[str, list[float]] = {}
        for step in (0, 1):
            feedback, _ = build_feedback(rt, chosen, step, policy)
            completions, mix = generate(rt, chosen, feedback, step, policy)
            rollouts, _ = score(rt, chosen, completions, policy)
            write_pool(rt, chosen, rollouts, feedback, step)
        for r in rollouts:
            if r.reward is not None:
                rewards.setdefault(r.kind, []).append(r.reward)
        samples, unusable = training_samples(rollouts, plain_prompt_ids(chosen, rt.tokenizer, cfg), cfg)
        estimators, log_ratios = rt.updater.offpolicy_diagnostics(samples)
    finally:
        rt.close()
    for figures in estimators.values():
        for kind in CONTEXT_KINDS:
            if kind in figures:
                figures[kind]["mass_vs_plain"] = mass_vs_plain(figures, kind)
    return {"problems": problems, "max_new_tokens": cfg.rollout.max_new_tokens,
            "temperature": cfg.rollout.temperature, "logprobs": cfg.logprobs_mode(),
            "trainer_temperature": cfg.trainer_temperature(), "mix": {k: v for k, v in mix.items() if k.startswith("mix/")},
            "rewards": {k: sum(v) / len(v) for k, v in rewards.items()},
            "counts": {k: len(v) for k, v in rewards.items()}, "unusable_groups": unusable,
            "completion_tokens_mean": sum(len(s.completion_ids) for s in samples) / max(1, len(samples)),
            "log_ratios": log_ratios, "estimators": estimators, "seconds": time.perf_counter() - started}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(name: str, result: dict) -> None:
    print(f"\n== {name}: {result['problems']} problems, {result['max_new_tokens']} new tokens (mean "
          f"{result['completion_tokens_mean']:.0f}), T={result['temperature']}, {result['logprobs']} log-probs, "
          f"trainer T={result['trainer_temperature']}, {result['seconds']:.0f} s")
    print("rewards: " + ", ".join(f"{k} {v:.2f} (n={result['counts'][k]})" for k, v in sorted(result["rewards"].items())))
    print("log pi(y|q_train) - log mu(y|q_sample): " + ", ".join(
        f"{k} {v['token_mean']:+.4f}/token, median {v['sequence_median']:+.2f}/sequence"
        for k, v in sorted(result["log_ratios"].items())))
    head = f"{'estimator':<20}{'kind':<13}{'w all':>8}{'ESS all':>9}{'A>0 n':>7}{'w A>0':>8}{'ESS A>0':>9}" \
           f"{'mass/plain':>12}{'capped':>8}"
    print(head)
    print("-" * len(head))
    for correction, figures in result["estimators"].items():
        for kind in CONTEXT_KINDS:
            f = figures.get(kind)
            if f is None:
                continue
            print(f"{correction:<20}{kind:<13}{f['weight_mean_all']:>8.3f}{f['ess_frac_all']:>9.3f}"
                  f"{int(f['positive']):>7}{f['weight_mean']:>8.3f}{f['ess_frac']:>9.3f}"
                  f"{_fmt(f['mass_vs_plain']):>12}{f['truncated_frac']:>8.3f}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="tiny,gsm8k", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--problems", type=int, default=16, help="problems per setting (G=8 rollouts each)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every setting")
    parser.add_argument("--out", default=str(REPO / "bench/results/offpolicy.json"))
    args = parser.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; expected some of {', '.join(SETTINGS)}")
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": {}}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"offpolicy-{name}-") as tmp:
            print(f"[{name}] generating two steps of rollouts ...", flush=True)
            out["settings"][name] = result = measure(SETTINGS[name] + args.set, args.problems, Path(tmp) / "run")
        print_table(name, result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['cpu']}, {out['cores']} cores)")


if __name__ == "__main__":
    main()
