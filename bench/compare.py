"""LANPO vs plain GRPO on `experiment-cpu`, the ablations, the mechanism check, and the report `docs/results.md`.

    .venv/bin/python bench/compare.py                  # every missing run, then the report (108 min here)
    .venv/bin/python bench/compare.py --report-only    # the report again from the finished runs
    .venv/bin/python bench/compare.py --seeds 0 --variants lanpo,grpo --steps 2 --out /tmp/c --report /tmp/c/r.md

One command regenerates everything: each run is a real `lanpo-train` flow (ephemeral Prefect API, MLflow, LanceDB
pool) in its own process, its summary saved under `--out`; a run whose summary exists and came from the same code
(tasks/provenance.py's code digest) is not repeated (delete the folder to start over). Runs differ only in what the
variant changes (`VARIANTS`: the method, ablations, the baseline controls and the other off-policy estimators) and
in `seed`, which sets the data order and the sampling seeds; the model, G, B, learning rate, step count and token budgets are those of
configs/experiment-cpu.yaml for all (grpo-g6 raises G). Both methods generate G rollouts per problem per step, so rollouts are equal by
construction; generated tokens differ (context prompts change answer lengths, and LANPO's abstractor writes lessons)
and are reported. Step 0 is the base model, evaluated once per seed. Curves and tables are read back from MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tasks.provenance import code_digest  # noqa: E402  (the repository root is on the path from here on)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG = "configs/experiment-cpu.yaml"
BENCH = "arithmetic-heldout"
PLAIN_ONLY = ["lanpo.rollout_mix.plain=1", "lanpo.rollout_mix.reflection=0", "lanpo.rollout_mix.abstraction=0"]
# name -> (config, overrides, group, description); the group sets the seeds (`--seeds`, `--control-seeds`,
# `--ablation-seeds`) and the order: the main comparison first, then the controls, then the ablations
VARIANTS: dict[str, tuple[str, list[str], str, str]] = {
    "lanpo": (CONFIG, [], "main", "LANPO, the defaults (mix 2 plain / 1 reflection / 1 abstraction of G=4)"),
    "grpo": (CONFIG, PLAIN_ONLY, "main", "plain GRPO (mix 4 plain of G=4)"),
    # equal compute: G=6 plain rollouts per problem, about LANPO's generated tokens (rollouts plus lessons)
    "grpo-g6": (CONFIG, [*PLAIN_ONLY, "rollout.num_generations=6"], "control",
                "plain GRPO with G=6: about LANPO's generated tokens"),
    # attribution: is a gain the feedback's, or the shared baseline's?
    "plain-baseline": (CONFIG, ["lanpo.baseline=plain_only"], "control",
                       "LANPO, advantages against the plain rollouts only"),
    "context-out": (CONFIG, ["lanpo.context_in_update=false"], "control",
                    "LANPO with context rollouts generated and pooled but left out of the update"),
    # the paper's two failure modes, built on purpose (lanpo.failure_control)
    "naive-same": (CONFIG, ["lanpo.failure_control=leak_correctness"], "control",
                   "naive same-problem feedback: attempts shown with the verifier's verdict, guard off"),
    "naive-other": (CONFIG, ["lanpo.failure_control=raw_experiences"], "control",
                    "naive other-problem feedback: raw experiences, no abstraction, no threshold, guard off"),
    "no-reflection": (CONFIG, ["lanpo.rollout_mix.plain=0.75", "lanpo.rollout_mix.reflection=0"], "ablation",
                      "LANPO without reflection (3 plain / 1 abstraction)"),
    "no-abstraction": (CONFIG, ["lanpo.rollout_mix.plain=0.75", "lanpo.rollout_mix.abstraction=0"], "ablation",
                       "LANPO without abstraction (3 plain / 1 reflection)"),
    "no-threshold": (CONFIG, ["lanpo.abstraction.min_similarity=null"], "ablation",
                     "LANPO, abstraction without the similarity threshold"),
    "train-context": (CONFIG, ["lanpo.train_prompt=context"], "ablation", "LANPO trained on the context prompt"),
    "keep-negatives": (CONFIG, ["lanpo.offpolicy.negative_advantage=keep"], "ablation",
                       "LANPO keeping negative-advantage context rollouts"),
    # the off-policy estimators other than the default token_truncated (docs/update.md, "Off-policy estimators")
    "is-sequence": (CONFIG, ["lanpo.offpolicy.correction=sequence_truncated"], "ablation",
                    "LANPO with the per-sequence truncated ratio"),
    "is-none": (CONFIG, ["lanpo.offpolicy.correction=none"], "ablation",
                "LANPO, context rollouts trained without correction"),
    "is-geometric": (CONFIG, ["lanpo.offpolicy.correction=geometric"], "ablation",
                     "LANPO with the geometric-mean sequence ratio"),
    "is-shaped": (CONFIG, ["lanpo.offpolicy.correction=shaped"], "ablation",
                  "LANPO with the shaped token ratio"),
}
MAIN = ("lanpo", "grpo")
STAGES = ("reflection", "abstraction", "generate", "verify", "pool", "update", "sync")
EVAL_KEYS = {"mean_at_2": "zero-shot mean@2 (T=0.7)", "greedy": "zero-shot greedy"}


def common_overrides(seed: int, steps: int | None, out: Path, extra: list[str]) -> list[str]:
    budget = [f"grpo.steps={steps}", f"eval.every={max(1, steps // 2)}"] if steps else []
    # eval.at_start off: the base model is evaluated once per seed by its own job (worker_base), not in every arm
    return [f"seed={seed}", "eval.at_start=false", f"paths.runs_dir={out / 'runs'}",
            "tracking.experiment=lanpo-compare", *budget, *extra]


# ------------------------------------------------------------------------------------------------ workers
def worker_train(variant: str, seed: int, steps: int | None, out: Path, extra: list[str]) -> dict:
    from flows.train import lanpo_train

    config, overrides, _, _ = VARIANTS[variant]
    started = time.perf_counter()
    summary = lanpo_train(config, [*overrides, *common_overrides(seed, steps, out, extra)],
                          f"compare-{variant}-s{seed}")
    return {"variant": variant, "seed": seed, "wall_seconds": time.perf_counter() - started, **summary}


def worker_base(seed: int, steps: int | None, out: Path, extra: list[str]) -> dict:
    from flows.evaluate import lanpo_evaluate

    started = time.perf_counter()
    metrics = lanpo_evaluate(CONFIG, None, common_overrides(seed, steps, out, extra), f"compare-base-s{seed}")
    return {"variant": "base", "seed": seed, "wall_seconds": time.perf_counter() - started, **metrics}


def run_job(name: str, args: list[str], out: Path, extra: list[str]) -> dict | None:
    """Run one worker in its own process (a crash costs that run only); its result is `<out>/<name>.json`."""
    target = out / f"{name}.json"
    if target.exists():
        done = json.loads(target.read_text())
        if done.get("code_digest") == code_digest():
            return done
        print(f"[{time.strftime('%H:%M:%S')}] {name}: its result came from other code; running it again", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, __file__, "--worker", *args, "--out", str(out),
                                *[f"--set={x}" for x in extra]], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not target.exists():
        print(f"    FAILED (exit {code}); log: {log}", flush=True)
        return None
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(target.read_text())


# ----------------------------------------------------------------------------------------------- collect
def histories(result: dict) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "n/a"
    m, s = mean_std([v * scale for v in values])
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def final(h: dict, key: str) -> float | None:
    return h[key][-1][1] if h.get(key) else None


def stage_mean(h: dict, key: str) -> float | None:
    """Mean of a per-step time over steps >= 1: step 0's generation includes starting the engine (~35 s for vLLM)."""
    series = h.get(key, [])
    later = [x for s, x in series if s > 0] or [x for _, x in series]
    return statistics.fmean(later) if later else None


def tokens_per_step(h: dict) -> list[tuple[int, float]]:
    lessons = dict(h.get("feedback/abstractor_tokens", []))
    return [(s, v + lessons.get(s, 0.0)) for s, v in h.get("rollout/completion_tokens", [])]


# ---------------------------------------------------------------------------------------------------- plots
def plot(runs: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"lanpo": "tab:blue", "grpo": "tab:orange"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    key = f"eval/{BENCH}/greedy"
    for (variant, seed), h in sorted(runs.items()):
        if variant not in MAIN:
            continue
        start = [(0, base[seed][key])] if seed in base and key in base[seed] else []
        points = start + h.get(key, [])
        colour = colours[variant]
        label = variant if seed == min(s for v, s in runs if v == variant) else None
        axes[0, 0].plot([s for s, _ in points], [v for _, v in points], marker="o", color=colour, alpha=0.7,
                        label=label)
        cumulative, total = {0: 0.0}, 0.0
        for s, t in tokens_per_step(h):
            total += t
            cumulative[s + 1] = total  # the policy after step s has consumed the tokens of steps 0..s
        xs = [cumulative.get(s, float("nan")) for s, _ in points]
        axes[0, 1].plot(xs, [v for _, v in points], marker="o", color=colour, alpha=0.7, label=label)
        for kind, style in (("plain", "-"), ("reflection", "--"), ("abstraction", ":")):
            series = h.get(f"rollout/reward_{kind}", [])
            if series:
                axes[0, 2].plot([s for s, _ in series], [v for _, v in series], style, color=colour, alpha=0.6,
                                label=f"{variant} {kind}" if label else None)
        for kind, style in (("reflection", "--"), ("abstraction", ":")):
            series = h.get(f"feedback/{kind}/dropped", [])
            audited = dict(h.get(f"feedback/{kind}/audited", []))
            if audited:
                axes[1, 0].plot(sorted(audited), [dict(series).get(s, 0.0) for s in sorted(audited)], style,
                                marker="x", color=colour, label=f"{variant} {kind}" if label else None)
        pool = h.get("pool/rows", [])
        axes[1, 1].plot([s for s, _ in pool], [v for _, v in pool], color=colour, alpha=0.7, label=label)
    titles = [("held-out greedy accuracy vs step", "step", "accuracy"),
              ("held-out greedy accuracy vs generated tokens", "tokens (rollouts + lessons)", "accuracy"),
              ("training reward by rollout kind", "step", "mean reward"),
              ("leakage-guard drops per step", "step", "contexts dropped"),
              ("experience pool size", "step", "rows")]
    for ax, (title, xl, yl) in zip(axes.flat, titles):
        ax.set_title(title), ax.set_xlabel(xl), ax.set_ylabel(yl), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[1, 2]
    variants = [v for v in MAIN if any(k[0] == v for k in runs)]
    bottom = [0.0] * len(variants)
    for stage in STAGES:
        heights = []
        for v in variants:
            per_run = [stage_mean(h, f"time/{stage}_seconds") or 0.0 for (vv, _), h in runs.items() if vv == v]
            heights.append(statistics.fmean(per_run) if per_run else 0.0)
        ax.bar(variants, heights, bottom=bottom, label=stage)
        bottom = [b + x for b, x in zip(bottom, heights)]
    ax.set_title("time per training step by stage"), ax.set_ylabel("seconds"), ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report
def report(out: Path, path: Path, plot_path: Path) -> str:
    results = [r for r in (json.loads(p.read_text()) for p in sorted(out.glob("*.json"))) if "variant" in r]
    runs = {(r["variant"], r["seed"]): histories(r) for r in results if r["variant"] in VARIANTS}
    base = {r["seed"]: r for r in results if r["variant"] == "base"}
    walls = {(r["variant"], r["seed"]): r["wall_seconds"] for r in results}
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    plot(runs, base, plot_path)
    seeds = {v: sorted(s for vv, s in runs if vv == v) for v in VARIANTS}
    steps = max(int(r.get("steps") or 0) for r in results)
    n_eval = "?"
    for b in base.values():
        if Path(b.get("predictions", "")).is_file():
            rows = [json.loads(x) for x in Path(b["predictions"]).open()]
            n_eval = str(len({r["problem_id"] for r in rows if r["mode"] == "greedy"}))
    lines = [
        "# Results: LANPO vs plain GRPO on experiment-cpu",
        "",
        f"Generated by `.venv/bin/python bench/compare.py` on {time.strftime('%Y-%m-%d')} (do not edit by hand; "
        "the prose that interprets the numbers is in the last section and is regenerated too).",
        "",
        f"Setup: {CONFIG}, the bundled SmolLM2-135M-Instruct, procedural arithmetic (operands 0..20, + - ×; "
        f"{steps or '?'} steps), held-out split of the same generator ({n_eval} problems, never a training "
        "question). Seeds: " + ", ".join(f"{v} {seeds[v]}" for v in VARIANTS if seeds[v]) + ".",
        "Each run is a real `lanpo-train` flow; every number below is read back from its MLflow run "
        "(experiment `lanpo-compare` in `mlruns/`).",
        "",
        f"![curves]({os.path.relpath(plot_path, path.parent)})",
        "",
        "## Final held-out accuracy (%, mean ± std over seeds)",
        "",
        "| method | seeds | " + " | ".join(EVAL_KEYS.values())
        + " | rollouts | generated tokens | prompt tokens | wall time (s) |",
        "|---|---|" + "---|" * (len(EVAL_KEYS) + 4),
    ]
    if base:
        row = [fmt([b[f"eval/{BENCH}/{k}"] for b in base.values() if f"eval/{BENCH}/{k}" in b]) for k in EVAL_KEYS]
        lines.append(f"| base model (step 0) | {len(base)} | " + " | ".join(row) + " | 0 | 0 | 0 | |")
    summary: dict[str, dict] = {}
    for v in VARIANTS:
        hs = [runs[(v, s)] for s in seeds[v]]
        if not hs:
            continue
        accs = {k: [final(h, f"eval/{BENCH}/{k}") for h in hs] for k in EVAL_KEYS}
        accs = {k: [x for x in xs if x is not None] for k, xs in accs.items()}
        tokens = [sum(t for _, t in tokens_per_step(h)) for h in hs]
        prompt_tokens = [sum(x for key in ("rollout/prompt_tokens", "feedback/abstractor_prompt_tokens")
                             for _, x in h.get(key, [])) for h in hs]
        rollouts = [sum(sum(x for _, x in h.get(f"mix/{k}", [])) for k in ("plain", "reflection", "abstraction"))
                    for h in hs]
        summary[v] = {"accs": accs, "tokens": tokens,
                      "by_seed": {s: final(runs[(v, s)], f"eval/{BENCH}/greedy") for s in seeds[v]}}
        wall = [walls[(v, s)] for s in seeds[v]]
        lines.append(f"| {v} | {len(hs)} | " + " | ".join(fmt(accs[k]) for k in EVAL_KEYS)
                     + f" | {statistics.fmean(rollouts):.0f} | {statistics.fmean(tokens):,.0f}"
                     + f" | {statistics.fmean(prompt_tokens):,.0f} | "
                     + f"{statistics.fmean(wall):.0f} ({', '.join(f'{w:.0f}' for w in wall)}) |")
    lines += ["", "Rollouts = problems x G over all steps (equal by construction). Generated tokens = rollout "
              "completions plus the abstractor's lessons; prompt tokens = what the rollouts and the abstractor read (contexts "
              "make LANPO's prompts longer). Wall time: mean (each seed); a run that shared the two cores "
              "with other work is slower, so compare stage times, not wall times, across runs. Ablations ran with "
              "one seed; compare them with the same seed of `lanpo` (first seed), not with the mean.", ""]

    step_seconds: dict[str, float] = {}
    lines += ["## Time per training step by stage (s, mean over steps and seeds)", "",
              "| method | " + " | ".join(STAGES) + " | total | eval (zero-shot) | eval (feedback) |",
              "|---|" + "---|" * (len(STAGES) + 3)]
    for v in VARIANTS:
        hs = [runs[(v, s)] for s in seeds[v]]
        if not hs:
            continue

        def avg(key: str) -> float:
            xs = [x for x in (stage_mean(h, key) for h in hs) if x is not None]
            return statistics.fmean(xs) if xs else 0.0
        stage_times = [avg(f"time/{s}_seconds") for s in STAGES]
        step_seconds[v] = sum(stage_times)
        lines.append(f"| {v} | " + " | ".join(f"{x:.2f}" for x in stage_times) + f" | {sum(stage_times):.1f} | "
                     f"{avg('time/eval_seconds'):.1f} | {avg('time/eval_feedback_seconds'):.1f} |")
    lines += ["", "Steps >= 1 (step 0's generation includes starting the vLLM engine). "
              "`reflection`/`abstraction`: building the contexts (abstraction includes the abstractor's "
              "generation); `generate`: the rollout engine call; `verify`: scoring; `pool`: the LanceDB write; "
              "`update`: the GRPO optimiser step; `sync`: checkpoint write plus the in-place weight sync of the "
              "rollout engine.", ""]

    lines += ["## LANPO internals (sum over steps, mean over seeds)", "",
              "| method | reflection contexts | abstraction contexts | guard drops | lessons generated | "
              "reward plain | reward reflection | reward abstraction |", "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        hs = [runs[(v, s)] for s in seeds[v]]
        if not hs or v == "grpo":
            continue

        def total(key: str) -> float:
            return statistics.fmean(sum(x for _, x in h.get(key, [])) for h in hs)

        def reward(kind: str) -> str:
            xs = [statistics.fmean(x for _, x in h[f"rollout/reward_{kind}"]) for h in hs
                  if h.get(f"rollout/reward_{kind}")]
            return f"{statistics.fmean(xs):.3f}" if xs else "n/a"
        drops = total("feedback/reflection/dropped") + total("feedback/abstraction/dropped")
        lines.append(f"| {v} | {total('feedback/reflection/built'):.0f} | {total('feedback/abstraction/built'):.0f} | "
                     f"{drops:.0f} | {total('feedback/abstraction/lessons_generated'):.0f} | {reward('plain')} | "
                     f"{reward('reflection')} | {reward('abstraction')} |")
    lines += [""]

    mech = out / "mechanism.json"
    if mech.exists():
        lines += mechanism_section(json.loads(mech.read_text()))
    lines += findings(summary, seeds, step_seconds)
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def mechanism_section(m: dict) -> list[str]:
    lines = ["## Mechanism check (bench/mechanism.py)", "", m["description"], "",
             "| abstractor | rollouts per kind | reward plain | reward abstraction | abstraction contexts | "
             "guard drops | lessons |", "|---|---|---|---|---|---|---|"]
    for r in m["results"]:
        lessons = "; ".join(r["lessons"][:2]) or "(none)"
        lines.append(f"| {r['abstractor']} | {r['rollouts_per_kind']} | {r['reward_plain']:.3f} | "
                     f"{r['reward_abstraction']:.3f} | {r['contexts']} | {r['guard_dropped']} | {lessons} |")
    return lines + ["", m.get("verdict", ""), ""]


def findings(summary: dict, seeds: dict, step_seconds: dict[str, float]) -> list[str]:
    lines = ["## What this shows", ""]
    if "lanpo" in summary and "grpo" in summary:
        for key, label in EVAL_KEYS.items():
            a, b = summary["lanpo"]["accs"][key], summary["grpo"]["accs"][key]
            if not a or not b:
                continue
            (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
            diff = (ma - mb) * 100
            noise = max(sa, sb) * 100
            verdict = ("within the seed-to-seed spread: no difference is established at this scale"
                       if abs(diff) <= noise else ("LANPO ahead" if diff > 0 else "GRPO ahead")
                       + " by more than one standard deviation")
            lines.append(f"- {label}: LANPO {ma * 100:.1f} vs GRPO {mb * 100:.1f} ({diff:+.1f} points, "
                         f"spread {noise:.1f}): {verdict}.")
        paired = [(summary["lanpo"]["by_seed"][s], summary["grpo"]["by_seed"][s])
                  for s in seeds["lanpo"] if s in summary["grpo"]["by_seed"]]
        if paired:
            diffs = ", ".join(f"{(a - b) * 100:+.1f}" for a, b in paired)
            wins = sum(a > b for a, b in paired)
            lines.append(f"- Zero-shot greedy, paired by seed (same data order and sampling seeds): LANPO - GRPO = "
                         f"{diffs} points; LANPO ahead on {wins} of {len(paired)} seeds.")
        ratio = statistics.fmean(summary["lanpo"]["tokens"]) / statistics.fmean(summary["grpo"]["tokens"])
        lines.append(f"- LANPO generated {ratio:.2f}x the tokens of GRPO for the same number of rollouts.")
        if step_seconds.get("grpo"):
            lines.append(f"- A LANPO training step took {step_seconds['lanpo'] / step_seconds['grpo']:.2f}x the time "
                         "of a GRPO step (the stage table: the difference is the abstractor's generation).")
    if "lanpo" in summary and seeds.get("lanpo"):
        ref = summary["lanpo"]["accs"]["greedy"][0] if summary["lanpo"]["accs"]["greedy"] else None
        for v in VARIANTS:
            if v in MAIN or v not in summary or not summary[v]["accs"]["greedy"] or ref is None:
                continue
            d = (summary[v]["accs"]["greedy"][0] - ref) * 100
            spread = max(mean_std(summary[m]["accs"]["greedy"])[1] for m in MAIN if m in summary) * 100
            size = "larger than" if abs(d) > spread else "within"
            lines.append(f"- {v}: greedy {summary[v]['accs']['greedy'][0] * 100:.1f} ({d:+.1f} vs lanpo seed "
                         f"{seeds['lanpo'][0]}: {size} the seed-to-seed spread of {spread:.1f}; one seed only).")
    missing = [v for v in VARIANTS if v not in summary]
    if missing:
        lines.append(f"- Not run yet: {', '.join(missing)}. `bench/compare.py` runs whatever is missing and keeps "
                     "what is finished.")
    return lines + [""]


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the main comparison (lanpo, grpo)")
    ap.add_argument("--control-seeds", default="0,1,2", help="seeds of the controls (equal compute, attribution, "
                    "failure modes)")
    ap.add_argument("--ablation-seeds", default="0", help="seeds of the ablations")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="override grpo.steps (default: the config's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "compare"))
    ap.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (smoke tests: a tiny model, fewer eval problems)")
    ap.add_argument("--no-mechanism", action="store_true", help="skip bench/mechanism.py")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps
    if args.worker:
        kind, seed = args.worker[0], int(args.worker[1])
        steps = int(args.worker[2]) if len(args.worker) > 2 and args.worker[2] != "-" else None
        result = (worker_base(seed, steps, out, args.set) if kind == "base"
                  else worker_train(kind, seed, steps, out, args.set))
        result["code_digest"] = code_digest()  # a result is reused only by the same code
        name = f"{kind}-s{seed}"
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        return
    report_path = Path(args.report).resolve()
    plot_path = report_path.parent / "results" / "curves.png"
    if not args.report_only:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        seeds = {"main": args.seeds, "control": args.control_seeds, "ablation": args.ablation_seeds}
        seeds = {group: [int(x) for x in text.split(",") if x.strip()] for group, text in seeds.items()}
        step_arg = str(steps) if steps else "-"
        started = time.perf_counter()
        # the main comparison seed by seed (so an interrupted run leaves paired seeds), then controls, ablations
        for seed in seeds["main"]:
            run_job(f"base-s{seed}", ["base", str(seed), step_arg], out, args.set)
            for v in variants:
                if VARIANTS[v][2] == "main":
                    run_job(f"{v}-s{seed}", [v, str(seed), step_arg], out, args.set)
        for group in ("control", "ablation"):
            for seed in seeds[group]:
                for v in variants:
                    if VARIANTS[v][2] == group:
                        run_job(f"{v}-s{seed}", [v, str(seed), step_arg], out, args.set)
        if not args.no_mechanism and not (out / "mechanism.json").exists():
            print(f"[{time.strftime('%H:%M:%S')}] mechanism check ...", flush=True)
            subprocess.call([sys.executable, str(REPO / "bench" / "mechanism.py"), "--out",
                             str(out / "mechanism.json")], cwd=REPO)
        print(f"all runs: {time.perf_counter() - started:.0f} s", flush=True)
    report(out, report_path, plot_path)
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()
