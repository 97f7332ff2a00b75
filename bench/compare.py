"""LANPO vs plain GRPO on `experiment-cpu`: the controls, the ablations, the mechanism check and docs/results.md.

    .venv/bin/python bench/compare.py                  # every missing run, then the report
    .venv/bin/python bench/compare.py --report-only    # the report again from the finished runs
    .venv/bin/python bench/compare.py --seeds 0 --variants lanpo,grpo --steps 2 --out /tmp/c --report /tmp/c/r.md

Each run is a real `lanpo-train` flow (ephemeral Prefect API, MLflow, LanceDB pool) in its own process; its
summary goes to `--out` (default docs/results/experiment, where the finished runs and their MLflow store are
committed) and is reused while its `reuse_key` matches (`job_key`: code, problem sets, resolved config), so an
interrupted sitting resumes and a changed verifier or dataset re-runs the arm. Arms (`VARIANTS`) differ only in
what they override and in `seed`, which sets the data order and the sampling seeds; everything else is
configs/experiment-cpu.yaml (docs/experiment.md: the task, the design, what was cut). The report's numbers are read
back from the MLflow runs the summaries name: means with t intervals over seeds, arm-minus-lanpo differences with a
paired bootstrap over seeds, a verdict per claim, per-kind update diagnostics, tokens and time.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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
    # equal compute: G=8 plain rollouts per problem, about LANPO's generated tokens (rollouts plus lessons; G=6
    # gave 0.62x of them: context prompts lengthen LANPO's answers)
    "grpo-g8": (CONFIG, [*PLAIN_ONLY, "rollout.num_generations=8"], "control",
                "plain GRPO with G=8: about LANPO's generated tokens"),
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
SEEDS = {"main": [0, 1, 2, 3, 4], "control": [0, 1, 2], "ablation": [0]}
"""The seeds each group runs by default (`--seeds`, `--control-seeds`, `--ablation-seeds`); the report lists the
runs still missing from them."""

STAGES = ("reflection", "abstraction", "generate", "verify", "pool", "update", "sync")
KINDS = ("plain", "reflection", "abstraction")
EVAL_KEYS = {"greedy": "zero-shot greedy", "mean_at_k": "zero-shot mean@2 (T=0.7)"}


def job_overrides(variant: str, seed: int, steps: int | None, out: Path, extra: list[str]) -> list[str]:
    budget = [f"grpo.steps={steps}", f"eval.every={max(1, steps // 2)}"] if steps else []
    # eval.at_start off: the base model is evaluated once per seed by its own job (variant "base"), not in every arm
    common = [f"seed={seed}", "eval.at_start=false", f"paths.runs_dir={out / 'runs'}",
              "tracking.experiment=lanpo-compare", *budget, *extra]
    return common if variant == "base" else [*VARIANTS[variant][1], *common]


def job_key(variant: str, seed: int, steps: int | None, out: Path, extra: list[str]) -> dict[str, str]:
    """What a finished run must match to be reused: the pipeline's code, the problems it saw (ids and gold answers,
    in order) and its resolved config without paths and tracking (those name where a run lives, not what it is)."""
    from lanpo_core.config import load_config
    from lanpo_core.data import load_problems
    from lanpo_core.runtime import data_dir
    from tasks.provenance import data_digest

    config = CONFIG if variant == "base" else VARIANTS[variant][0]
    cfg = load_config(config, job_overrides(variant, seed, steps, out, extra))
    sets = [load_problems(spec, data_dir(cfg)) for spec in [cfg.data.train, *cfg.data.eval]]
    settings = cfg.model_dump(mode="json", exclude={"paths", "tracking"})
    return {"code": code_digest(), "data": data_digest([(f"{i}:{s.name}", s.problems) for i, s in enumerate(sets)]),
            "config": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()}


# ------------------------------------------------------------------------------------------------ workers
def worker(variant: str, seed: int, steps: int | None, out: Path, extra: list[str]) -> dict:
    started = time.perf_counter()
    if variant == "base":
        from flows.evaluate import lanpo_evaluate
        from lanpo_core.config import load_config
        from tasks.tracking import tracking_uri

        overrides = job_overrides(variant, seed, steps, out, extra)
        summary = lanpo_evaluate(CONFIG, None, overrides, f"compare-base-s{seed}")
        summary["mlflow_tracking_uri"] = tracking_uri(load_config(CONFIG, overrides))  # the train flow reports it
    else:
        from flows.train import lanpo_train

        summary = lanpo_train(VARIANTS[variant][0], job_overrides(variant, seed, steps, out, extra),
                              f"compare-{variant}-s{seed}")
    return {"variant": variant, "seed": seed, "wall_seconds": time.perf_counter() - started, **summary}


def run_job(variant: str, seed: int, steps: int | None, out: Path, extra: list[str],
            keep_checkpoints: bool = False) -> dict | None:
    """Run one job in its own process (a crash costs that run only); its result is `<out>/<variant>-s<seed>.json`,
    reused while its `reuse_key` (`job_key`) matches."""
    name = f"{variant}-s{seed}"
    target, key = out / f"{name}.json", job_key(variant, seed, steps, out, extra)
    if target.exists():
        done = json.loads(target.read_text())
        if done.get("reuse_key") == key:
            return done
        changed = [part for part in key if (done.get("reuse_key") or {}).get(part) != key[part]]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: its {'/'.join(changed)} changed; running it again", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, __file__, "--worker", variant, str(seed), str(steps or "-"),
                                "--out", str(out), *[f"--set={x}" for x in extra]],
                               cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not target.exists():
        print(f"    FAILED (exit {code}); log: {log}", flush=True)
        return None
    result = json.loads(target.read_text()) | {"reuse_key": key}
    target.write_text(json.dumps(result, indent=1, default=str))
    if not keep_checkpoints:
        # A finished run's summary and MLflow run hold all the report reads; its checkpoints (weights and optimizer
        # state, two kept per run) would fill the disk long before the arm set is done.
        for folder in (out / "runs").glob(f"compare-{name}-*/checkpoints"):
            shutil.rmtree(folder)
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


# ----------------------------------------------------------------------------------------------- collect
@dataclass
class Run:
    """One finished run as its MLflow run holds it."""
    variant: str
    seed: int
    wall: float
    metrics: dict[str, list[tuple[int, float]]]  # key -> [(step, value)], the full history
    params: dict[str, str]  # the resolved config as logged

    def series(self, key: str) -> list[tuple[int, float]]:
        return self.metrics.get(key, [])

    def last(self, key: str) -> float | None:
        return self.metrics[key][-1][1] if self.metrics.get(key) else None

    def total(self, *keys: str) -> float:
        return sum(v for key in keys for _, v in self.series(key))

    def mean(self, key: str, skip_first: bool = False) -> float | None:
        """Mean over steps; `skip_first` drops the first step (its generation includes starting the vLLM engine)."""
        series = self.series(key)
        values = [v for s, v in series if s > series[0][0] or not skip_first] or [v for _, v in series]
        return statistics.fmean(values) if values else None

    def step_seconds(self) -> list[tuple[int, float]]:
        """Training time per step (every stage but evaluation)."""
        per_step: dict[int, float] = {}
        for stage in STAGES:
            for s, v in self.series(f"time/{stage}_seconds"):
                per_step[s] = per_step.get(s, 0.0) + v
        return sorted(per_step.items())

    def tokens(self) -> tuple[float, float]:
        """(generated, prompt) tokens over the run: rollouts plus the abstractor's calls."""
        return (self.total("rollout/completion_tokens", "feedback/abstractor_tokens"),
                self.total("rollout/prompt_tokens", "feedback/abstractor_prompt_tokens"))


def store_uri(out: Path, result: dict) -> str:
    """The MLflow store beside the summaries (where a committed experiment keeps it), else the one the run named."""
    return f"sqlite:///{out / 'mlflow.db'}" if (out / "mlflow.db").exists() else result["mlflow_tracking_uri"]


OLD_MEAN_AT = re.compile(r"(eval/.+)/mean_at_\d+")


def current_names(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """A run's metrics in today's names and steps (tasks/tracking.py): runs logged before mean@k was named
    `mean_at_k` (the experiment's, `mean_at_2`), and before training step t was logged at MLflow step t counted from
    1 (they logged it from 0; their evaluations already sat at the step of the policy evaluated)."""
    from_zero = any(step == 0 for step, _ in history.get("time/update_seconds", []))
    renamed = {}
    for key, points in history.items():
        if from_zero and not key.startswith(("eval/", "system/")):
            points = [(step + 1, value) for step, value in points]
        renamed[OLD_MEAN_AT.sub(r"\1/mean_at_k", key)] = points
    return renamed


def load_runs(out: Path, folder: Path | None = None) -> tuple[dict[tuple[str, int], Run], dict[int, dict[str, float]]]:
    """Every finished run of `folder` (default `out`) read back from MLflow: training runs by (variant, seed), base
    evals by seed."""
    from mlflow import MlflowClient

    runs, base = {}, {}
    for path in sorted((folder or out).glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("variant") not in (*VARIANTS, "base"):
            continue
        client = MlflowClient(tracking_uri=store_uri(out, result))
        data = client.get_run(result["mlflow_run_id"]).data
        logged = data.metrics
        if result["variant"] == "base":
            base[result["seed"]] = {OLD_MEAN_AT.sub(r"\1/mean_at_k", k): v for k, v in logged.items()}
            continue
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(result["mlflow_run_id"], key))
                   for key in logged}
        runs[(result["variant"], result["seed"])] = Run(result["variant"], result["seed"], result["wall_seconds"],
                                                         current_names(history), data.params)
    return runs, base


# ----------------------------------------------------------------------------------------------- statistics
# two-sided 95 % Student t quantiles by degrees of freedom: with 3-5 seeds the normal 1.96 would be far too narrow
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean over seeds and its 95 % t interval (nan bounds for one seed)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired_bootstrap(diffs: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean of per-seed differences and the 95 % percentile interval of its bootstrap over seeds. With n seeds the
    resampled means take few distinct values (n=3: 10), so the interval is coarse and, for n < 5, optimistic."""
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def verdict(diffs: list[float]) -> str:
    """A claim "a > b" from its per-seed differences a - b. The interval is the wider of the paired bootstrap and the
    paired t interval: with 3-5 seeds the bootstrap alone is too narrow (n=2 gives [min, max])."""
    if len(diffs) < 3:
        return f"not established ({len(diffs)} seed{'s' if len(diffs) != 1 else ''}: too few for an interval)"
    (_, blo, bhi), (_, tlo, thi) = paired_bootstrap(diffs), mean_ci(diffs)
    lo, hi = min(blo, tlo), max(bhi, thi)
    return "established" if lo > 0 else "contradicted" if hi < 0 else "not established"


def diff_text(diffs: list[float]) -> str:
    """Mean per-seed difference in points, with its bootstrap and t intervals when there are 3 seeds or more."""
    m = statistics.fmean(diffs)
    if len(diffs) < 3:
        return f"{100 * m:+.1f}"
    (_, blo, bhi), (_, tlo, thi) = paired_bootstrap(diffs), mean_ci(diffs)
    return f"{100 * m:+.1f} [{100 * blo:+.1f}, {100 * bhi:+.1f}] (t: [{100 * tlo:+.1f}, {100 * thi:+.1f}])"


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}"


def interval(values: list[float]) -> str:
    """Mean over seeds in %, with its 95 % t interval from 3 seeds on."""
    m, lo, hi = mean_ci(values)
    return f"{100 * m:.1f}" if len(values) < 3 else f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


class Arms:
    """The finished runs grouped by arm, with the per-seed numbers the tables and verdicts need."""

    def __init__(self, runs: dict[tuple[str, int], Run], base: dict[int, dict[str, float]],
                 replicates: dict[tuple[str, int], Run]):
        self.runs, self.base, self.replicates = runs, base, replicates
        self.seeds = {v: sorted(s for vv, s in runs if vv == v) for v in VARIANTS}
        self.names = [v for v in VARIANTS if self.seeds[v]]

    def of(self, variant: str) -> list[Run]:
        return [self.runs[(variant, s)] for s in self.seeds[variant]]

    def final(self, variant: str, key: str) -> dict[int, float]:
        return {r.seed: x for r in self.of(variant) if (x := r.last(f"eval/{BENCH}/{key}")) is not None}

    def paired(self, a: str, b: str, key: str = "greedy") -> tuple[list[int], list[float]]:
        """(seeds, a - b per seed) on the final `key` accuracy over the seeds both ran (same data order and
        sampling seeds)."""
        fa, fb = self.final(a, key), self.final(b, key)
        shared = sorted(set(fa) & set(fb))
        return shared, [fa[s] - fb[s] for s in shared]

    def paired_mean(self, a: str, b: str, key: str) -> list[float]:
        """a - b per seed on a per-step training metric (mean over steps)."""
        ma = {r.seed: r.mean(key) for r in self.of(a)}
        mb = {r.seed: r.mean(key) for r in self.of(b)}
        return [ma[s] - mb[s] for s in sorted(set(ma) & set(mb)) if ma[s] is not None and mb[s] is not None]


# ---------------------------------------------------------------------------------------------------- plots
def eval_points(run: Run, base: dict[int, dict[str, float]], key: str) -> list[tuple[int, float, float, float]]:
    """(step, accuracy, tokens so far, training seconds so far) at each evaluation, step 0 = the base model."""
    tokens: dict[int, float] = {}
    for k in ("rollout/completion_tokens", "feedback/abstractor_tokens", "rollout/prompt_tokens",
              "feedback/abstractor_prompt_tokens"):
        for s, v in run.series(k):
            tokens[s] = tokens.get(s, 0.0) + v
    seconds = dict(run.step_seconds())
    points = [(0, base[run.seed][key])] if key in base.get(run.seed, {}) else []
    # the policy evaluated after step s has consumed the tokens and time of steps 1..s (MLflow step s for both)
    return [(s, acc, sum(t for ss, t in tokens.items() if ss <= s), sum(t for ss, t in seconds.items() if ss <= s))
            for s, acc in points + run.series(key)]


def plot(arms: Arms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(arms.names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    curve_arms = [v for v in arms.names if VARIANTS[v][2] in ("main", "control")]
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    key = f"eval/{BENCH}/greedy"
    for v in curve_arms:
        points = [eval_points(r, arms.base, key) for r in arms.of(v)]
        for column, x in ((0, 0), (1, 2), (2, 3)):
            ax = axes[0, column]
            for p in points:  # each seed faint, the mean over seeds bold
                ax.plot([q[x] for q in p], [q[1] for q in p], color=colours[v], alpha=0.25, linewidth=0.8)
            length = min(len(p) for p in points)
            ax.plot([statistics.fmean(p[i][x] for p in points) for i in range(length)],
                    [statistics.fmean(p[i][1] for p in points) for i in range(length)], marker="o",
                    color=colours[v], label=f"{v} ({len(points)})", linewidth=2 if v in MAIN else 1.2,
                    linestyle="-" if v in MAIN else "--")
    for v, style in (("lanpo", "-"), ("naive-same", "--"), ("naive-other", ":")):
        for kind in KINDS[1:]:
            runs = arms.of(v) if v in arms.names else []
            series = [dict(r.series(f"rollout/reward_{kind}")) for r in runs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if steps:
                axes[1, 0].plot(steps, [statistics.fmean(s[x] for s in series) for x in steps], style,
                                color="tab:red" if kind == "reflection" else "tab:green", label=f"{v} {kind}")
    for kind, colour in zip(KINDS, ("tab:blue", "tab:red", "tab:green")):
        series = [dict(r.series(f"update/kind/{kind}/weight_mass")) for r in arms.of("lanpo")]
        steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if steps:
            axes[1, 1].plot(steps, [statistics.fmean(s[x] for s in series) for x in steps], color=colour,
                            label=f"lanpo {kind}")
    titles = [("held-out greedy accuracy vs step", "step", "accuracy"),
              ("... vs tokens processed", "tokens (generated + prompt, rollouts + abstractor)", "accuracy"),
              ("... vs training time", "seconds (training stages, evaluation excluded)", "accuracy"),
              ("training reward of the context rollouts (mean over seeds)", "step", "mean reward"),
              ("update weight mass by rollout kind (lanpo)", "step", "weight mass")]
    for ax, (title, xl, yl) in zip(axes.flat, titles):
        ax.set_title(title), ax.set_xlabel(xl), ax.set_ylabel(yl), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax, bottom = axes[1, 2], [0.0] * len(arms.names)
    for stage in STAGES:
        heights = [statistics.fmean(r.mean(f"time/{stage}_seconds", skip_first=True) or 0.0 for r in arms.of(v))
                   for v in arms.names]
        ax.bar(arms.names, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title("time per training step by stage"), ax.set_ylabel("seconds"), ax.legend(fontsize=7)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report
def logged_config(params: dict[str, str]) -> dict[str, object]:
    """A run's config params with lists and mappings as values: JSON today (tasks/tracking.py), Python repr from the
    experiment's code, which also logged `data.eval` as one list where today each field is `data.eval.<i>.<field>`."""
    def value(text: str) -> object:
        if not text.startswith(("[", "{")):
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return ast.literal_eval(text)
    return {k: value(v) for k, v in params.items()}


def report(out: Path, path: Path, plot_path: Path, command: str) -> str:
    runs, base = load_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    arms = Arms(runs, base, load_runs(out, out / "replicates")[0])
    plot(arms, plot_path)
    first = arms.of("lanpo")[0] if arms.seeds["lanpo"] else next(iter(runs.values()))
    setup = logged_config(first.params)
    ranges = " and ".join(f"{lo}..{hi}" for lo, hi in setup["data.train.arithmetic.operand_ranges"] or [])
    size = setup["data.eval"][0]["size"] if "data.eval" in setup else setup["data.eval.0.size"]
    n_eval = min([int(size), *([int(setup["eval.limit"])] if setup["eval.limit"] else [])])
    p = statistics.fmean(x for v in MAIN for x in arms.final(v, "greedy").values())
    # The precision is decided from the CPU at run time (lanpo_core/hardware.py): a sitting on a CPU without native
    # bf16 runs fp32 and its runs would differ by more than the seed does. Mixed settings are named, not averaged over.
    machines: dict[str, list[str]] = {}
    for r in runs.values():
        machine = (f"{r.params.get('hardware/cpu', '?')}, {r.params.get('hardware/torch_threads', '?')} torch threads, "
                   f"update in {'bf16' if r.params.get('precision/update_bf16') == 'true' else 'fp32'}, vLLM in "
                   f"{r.params.get('precision/vllm_dtype', '?')}")
        machines.setdefault(machine, []).append(f"{r.variant}-s{r.seed}")
    if len(machines) == 1:
        hardware = f"all runs: {next(iter(machines))}"
    else:
        hardware = "**mixed machines, the arms are not comparable as they stand**: " + "; ".join(
            f"{m} ({len(names)} runs: {', '.join(sorted(names))})" for m, names in machines.items())
    lines = [
        "# Results: LANPO vs plain GRPO on experiment-cpu",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from the runs in "
        f"`{os.path.relpath(out, path.parent)}/` (do not edit by hand; the verdicts are regenerated too). "
        "Every number is read back from the MLflow run each summary names (the store "
        f"`{os.path.relpath(out / 'mlflow.db', path.parent)}`, experiment `lanpo-compare`).",
        "",
        f"**Setup** (from the runs' logged config). {CONFIG}: {setup['model.name_or_path']} on procedural "
        f"arithmetic, operands {ranges}, operations {' '.join(setup['data.train.arithmetic.operations'])}; "
        f"{setup['data.train.size']} training problems, B={setup['rollout.batch_problems']}, "
        f"G={setup['rollout.num_generations']} (grpo-g8: 8), {setup['grpo.steps']} steps, learning rate "
        f"{setup['grpo.learning_rate']}, training temperature {setup['rollout.temperature']}. Held out: {n_eval} "
        "problems of the same generator that never share a question with training, scored greedy and "
        f"mean@{setup['eval.samples']} at T={setup['eval.temperature']}. One run's greedy accuracy has a standard "
        f"error of about {100 * math.sqrt(p * (1 - p) / n_eval):.1f} points from the finite held-out set alone; the "
        "intervals below are over seeds (seed = data order and sampling seeds), which include it. Machine and "
        f"precision (decided from the CPU at run time), {hardware}. Why this task, and what was cut: "
        "docs/experiment.md.",
        "",
    ]
    lines += verdict_section(arms)
    lines += accuracy_section(arms)
    lines += [f"![curves]({os.path.relpath(plot_path, path.parent)})", "",
              "Top: greedy held-out accuracy (step 0 = base model) against steps, tokens processed and training "
              "time; faint lines are seeds, bold/dashed the mean. Bottom: training reward of the reflection (red) "
              "and abstraction (green) rollouts for lanpo and the two failure-mode controls; LANPO's update weight "
              "mass per rollout kind; time per step by stage.", ""]
    lines += diagnostics_section(arms)
    lines += time_section(arms)
    mech = out / "mechanism.json"
    if mech.exists():
        lines += mechanism_section(json.loads(mech.read_text()))
    missing = [f"{v} (seed{'s' if len(todo) > 1 else ''} {', '.join(map(str, todo))})" for v in VARIANTS
               if (todo := [s for s in SEEDS[VARIANTS[v][2]] if s not in arms.seeds[v]])]
    missing += [] if mech.exists() else ["the mechanism check (bench/mechanism.py)"]
    if missing:
        lines += ["## Not run yet", "", f"Of the default seeds: {'; '.join(missing)}. `bench/compare.py` runs what "
                  "is missing and keeps what is finished (docs/experiment.md, \"Resuming a sitting\").", ""]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def verdict_section(arms: Arms) -> list[str]:
    lines = ["## Verdicts", "",
             "Each claim is a paired difference of final zero-shot greedy accuracy (points, mean over the seeds both "
             "arms ran, with its 95 % paired bootstrap interval over seeds and the paired t interval): "
             "*established* if the wider of the two excludes 0 in the claim's direction, *contradicted* if it "
             "excludes 0 in the other, else *not established*; no verdict from fewer than 3 seeds.", ""]

    def claim(text: str, a: str, b: str, extra: str = "") -> None:
        if not (arms.seeds[a] and arms.seeds[b]):
            lines.append(f"- {text}: not run yet ({a if not arms.seeds[a] else b} has no finished run).")
            return
        seeds, diffs = arms.paired(a, b)
        _, mean2 = arms.paired(a, b, "mean_at_k")
        lines.append(f"- {text}: {a} - {b} = {diff_text(diffs)} greedy, {diff_text(mean2)} mean@2 "
                     f"(seeds {seeds}): **{verdict(diffs)}**.{extra}")

    def context_reward(a: str, kind: str, reading: str) -> str:
        """The training reward of the arm's context rollouts against lanpo's: where a leak or bad context shows."""
        diffs = arms.paired_mean(a, "lanpo", f"rollout/reward_{kind}") if arms.seeds[a] else []
        return f" Training reward of its {kind} rollouts vs lanpo's: {diff_text(diffs)} points ({reading})." \
            if diffs else ""

    lanpo_tokens = sum(r.tokens()[0] for r in arms.of("lanpo")) / max(1, len(arms.of("lanpo")))
    g8_tokens = sum(r.tokens()[0] for r in arms.of("grpo-g8")) / max(1, len(arms.of("grpo-g8")))
    claim("LANPO beats GRPO at an equal number of rollouts", "lanpo", "grpo")
    claim("LANPO beats GRPO at about equal generated tokens (GRPO with G=8)", "lanpo", "grpo-g8",
          f" Generated tokens, grpo-g8 / lanpo: {g8_tokens / lanpo_tokens:.2f}." if g8_tokens and lanpo_tokens else "")
    claim("Reward-agnostic reflection avoids the leak of naive same-problem feedback", "lanpo", "naive-same",
          context_reward("naive-same", "reflection", "a leak shows as a higher training reward that zero-shot "
                         "accuracy does not follow"))
    claim("Relevant abstraction avoids the collapse of raw other-problem experiences", "lanpo", "naive-other",
          context_reward("naive-other", "abstraction", "raw, unfiltered experiences as context"))
    claim("The context rollouts' gradient helps (vs context rollouts left out of the update)", "lanpo",
          "context-out")
    claim("The shared baseline is not the source of a difference (vs plain-only baseline; 'not established' is "
          "the expected outcome)", "lanpo", "plain-baseline")
    pairs = {(v, seed): (arms.runs[(v, seed)], again) for (v, seed), again in sorted(arms.replicates.items())
             if (v, seed) in arms.runs}
    if pairs:
        def shift(k: str) -> str:
            d = [100 * (again.last(f"eval/{BENCH}/{k}") - first.last(f"eval/{BENCH}/{k}")) for first, again in pairs.values()]
            return f"{statistics.mean(d):+.1f}" + (f" (range {min(d):+.1f} to {max(d):+.1f})" if len(d) > 1 else "")
        each = ", ".join(f"{v} s{seed} {pct(first.last(f'eval/{BENCH}/greedy'))} then "
                         f"{pct(again.last(f'eval/{BENCH}/greedy'))}" for (v, seed), (first, again) in pairs.items())
        lines.append(f"- Reproducibility: runs made again later with the same code, config and seed (greedy: {each}) "
                     f"moved by {shift('greedy')} greedy and {shift('mean_at_k')} mean@2 points. That is what a seed "
                     "does not pin down (sampling on CPU threads, another sitting of the machine); arms run in "
                     "different sittings (driver.log) differ by this much before any effect.")
    mass, count = kind_mass(arms.of("lanpo")) if arms.seeds["lanpo"] else ({}, {})
    if sum(mass.values()) and sum(count.values()):
        context = [k for k in KINDS if k != "plain"]
        lines.append(f"- What the feedback could move: in lanpo the context rollouts were "
                     f"{100 * sum(count[k] for k in context) / sum(count.values()):.0f} % of the rollouts trained and "
                     f"carried {100 * sum(mass[k] for k in context) / sum(mass.values()):.0f} % of the update's signal "
                     "(sum |A·w|; per kind in \"What reached the update\").")
    ablations = [v for v in arms.names if VARIANTS[v][2] == "ablation"]
    if ablations:
        diffs = [arms.final("lanpo", "greedy")[s] - arms.final("grpo", "greedy")[s]
                 for s in set(arms.final("lanpo", "greedy")) & set(arms.final("grpo", "greedy"))]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        parts = []
        for v in ablations:
            m = statistics.fmean(arms.paired(v, "lanpo")[1])
            size = "beyond" if not math.isnan(sd) and abs(m) > sd else "within"
            parts.append(f"{v} {100 * m:+.1f} ({size})")
        lines.append(f"- Components (ablations, {len(arms.seeds[ablations[0]])} seed each, ablation - lanpo on the "
                     f"same seed): {'; '.join(parts)}. With one seed there is no interval; 'within' means inside "
                     f"one standard deviation of the lanpo - grpo seed-paired differences ({pct(sd)} points), i.e. "
                     "not distinguishable from run-to-run noise here.")
    return lines + [""]


def accuracy_section(arms: Arms) -> list[str]:
    lines = ["## Final held-out accuracy", "",
             "Mean over seeds [95 % t interval, from 3 seeds on], %. Δ: the arm minus lanpo on the seeds both ran [95 % paired "
             "bootstrap] (t: paired t interval), from 3 seeds on. Tokens and wall time are means per run; "
             "the last column is each seed's final greedy accuracy (a low seed of lanpo moves every Δ).", "",
             "| arm | group | seeds | " + " | ".join(EVAL_KEYS.values()) + " | Δ greedy vs lanpo | rollouts | "
             "generated tokens | prompt tokens | wall time (s) | greedy by seed |",
             "|---|---|---|" + "---|" * (len(EVAL_KEYS) + 6)]
    if arms.base:
        cells = [interval([b[f"eval/{BENCH}/{k}"] for b in arms.base.values()]) for k in EVAL_KEYS]
        lines.append(f"| base model (step 0) | | {len(arms.base)} | " + " | ".join(cells) + " | | 0 | 0 | 0 | | |")
    for v in arms.names:
        runs = arms.of(v)
        cells = [interval(list(arms.final(v, k).values())) if arms.final(v, k) else "n/a"
                 for k in EVAL_KEYS]
        delta = "" if v == "lanpo" else diff_text(arms.paired(v, "lanpo")[1])
        rollouts = statistics.fmean(r.total(*(f"mix/{k}" for k in KINDS)) for r in runs)
        generated, prompt = (statistics.fmean(t) for t in zip(*(r.tokens() for r in runs)))
        lines.append(f"| {v} | {VARIANTS[v][2]} | {len(runs)} | " + " | ".join(cells) + f" | {delta} | "
                     f"{rollouts:.0f} | {generated:,.0f} | {prompt:,.0f} | "
                     f"{statistics.fmean(r.wall for r in runs):.0f} | "
                     + ", ".join(f"s{seed} {100 * x:.1f}" for seed, x in arms.final(v, "greedy").items()) + " |")
    lines += ["", "Arms: " + "; ".join(f"**{v}** {VARIANTS[v][3]}" for v in arms.names) + ".", ""]
    return lines


def kind_mass(runs: list[Run]) -> tuple[dict[str, float], dict[str, float]]:
    """Per rollout kind, the update's signal sum |A·w| and the rollouts trained, over all steps, mean over runs."""
    mass = {k: statistics.fmean(r.total(f"update/kind/{k}/weight_mass") for r in runs) for k in KINDS}
    count = {k: statistics.fmean(r.total(f"update/count/{k}") for r in runs) for k in KINDS}
    return mass, count


def diagnostics_section(arms: Arms) -> list[str]:
    lines = ["## What reached the update, per arm", "",
             "Over all steps, mean over seeds. Mass: each kind's share of the update's signal, sum |A·w| over its "
             "rollouts after the off-policy weights (docs/update.md, \"Per-kind diagnostics\"), and per rollout of "
             "the kind; plain GRPO's per-rollout mass is the yardstick. Weight: mean off-policy weight of the "
             "context rollouts with signal (1 = trained as if on-policy), ESS their effective sample size as a "
             "fraction of their count. Negatives dropped: context rollouts with a negative advantage, left out by "
             "the default `lanpo.offpolicy.negative_advantage` (the keep-negatives ablation keeps them). Guard: "
             "contexts the leakage guard dropped (in parentheses: would have "
             "dropped, for the failure controls that run without it). Reward: training reward by rollout kind.", "",
             "| arm | mass share plain / refl. / abstr. (%) | mass per rollout plain / refl. / abstr. | weight refl. / "
             "abstr. | ESS refl. / abstr. | negatives dropped refl. / abstr. | guard dropped (would drop) | lessons | "
             "reward plain / refl. / abstr. |", "|---|---|---|---|---|---|---|---|---|"]

    def avg(runs: list[Run], key: str) -> str:
        xs = [x for x in (r.mean(key) for r in runs) if x is not None]
        return f"{statistics.fmean(xs):.3f}" if xs else "-"

    def tot(runs: list[Run], *keys: str) -> float:
        return statistics.fmean(r.total(*keys) for r in runs)

    for v in arms.names:
        runs = arms.of(v)
        mass, count = kind_mass(runs)
        share = " / ".join(f"{100 * mass[k] / sum(mass.values()):.0f}" if sum(mass.values()) else "-" for k in KINDS)
        per = " / ".join(f"{mass[k] / count[k]:.3f}" if count[k] and mass[k] else "-" for k in KINDS)
        weight = " / ".join(avg(runs, f"update/kind/{k}/weight_mean") for k in KINDS[1:])
        ess = " / ".join(avg(runs, f"update/kind/{k}/ess_frac") for k in KINDS[1:])
        negatives = " / ".join(f"{tot(runs, f'update/kind/{k}/dropped_negatives'):.0f}" for k in KINDS[1:])
        dropped = tot(runs, *(f"feedback/{k}/dropped" for k in KINDS[1:]))
        would = tot(runs, *(f"feedback/{k}/would_drop" for k in KINDS[1:]))
        reward = " / ".join(avg(runs, f"rollout/reward_{k}") for k in KINDS)
        lines.append(f"| {v} | {share} | {per} | {weight} | {ess} | {negatives} | {dropped:.0f} ({would:.0f}) | "
                     f"{tot(runs, 'feedback/abstraction/lessons_generated'):.0f} | {reward} |")
    return lines + [""]


def time_section(arms: Arms) -> list[str]:
    lines = ["## Time per training step by stage (s, mean over the steps after the first and over seeds)", "",
             "| arm | " + " | ".join(STAGES) + " | total | eval |", "|---|" + "---|" * (len(STAGES) + 2)]
    for v in arms.names:
        runs = arms.of(v)
        times = [statistics.fmean(r.mean(f"time/{s}_seconds", skip_first=True) or 0.0 for r in runs) for s in STAGES]
        evals = statistics.fmean(r.mean("time/eval_seconds") or 0.0 for r in runs)
        lines.append(f"| {v} | " + " | ".join(f"{x:.2f}" for x in times) + f" | {sum(times):.1f} | {evals:.1f} |")
    return lines + ["", "`reflection`/`abstraction`: building the contexts (abstraction includes the abstractor's "
                    "generation); `generate`: the rollout engine call; `verify`: scoring; `pool`: the LanceDB write; "
                    "`update`: the optimiser step; `sync`: checkpoint write plus the rollout engine's weight sync. "
                    "The first step is left out (its generation includes starting the vLLM engine). Times of runs made "
                    "while other work shared the 2 cores (driver.log) are inflated: compare times within a sitting.",
                    ""]


def mechanism_section(m: dict) -> list[str]:
    lines = ["## Mechanism check (bench/mechanism.py)", "", m["description"], "",
             "| abstractor | rollouts per kind | reward plain | reward abstraction | abstraction contexts | "
             "guard drops | lessons |", "|---|---|---|---|---|---|---|"]
    for r in m["results"]:
        lessons = "; ".join(r["lessons"][:2]) or "(none)"
        lines.append(f"| {r['abstractor']} | {r['rollouts_per_kind']} | {r['reward_plain']:.3f} | "
                     f"{r['reward_abstraction']:.3f} | {r['contexts']} | {r['guard_dropped']} | {lessons} |")
    lines += ["", f"What the update would give these rollouts ({m['offpolicy']['correction']} estimator, negatives "
              f"{m['offpolicy']['negative_advantage']}): per kind, the rollouts with signal, their mean off-policy "
              "weight and ESS fraction, the signal sum |A·w|, and the mean log-ratio per token of the plain-prompt "
              "policy to the sampling prompt.", "",
              "| abstractor | kind | trained | weight mean | ESS | weight mass | negatives dropped | log-ratio/token |",
              "|---|---|---|---|---|---|---|---|"]
    for r in m["results"]:
        for kind, d in sorted(r.get("kind_diagnostics", {}).items()):
            lines.append(f"| {r['abstractor']} | {kind} | {d['trained']:.0f} | {d['weight_mean']:.3f} | "
                         f"{d['ess_frac']:.3f} | {d['weight_mass']:.1f} | {d['dropped_negatives']:.0f} | "
                         f"{r['log_ratios'][kind]['token_mean']:+.3f} |")
    return lines + ["", m.get("verdict", ""), ""]


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    def seed_list(group: str) -> str:
        return ",".join(map(str, SEEDS[group]))
    ap.add_argument("--seeds", default=seed_list("main"), help="seeds of the main comparison (lanpo, grpo)")
    ap.add_argument("--control-seeds", default=seed_list("control"), help="seeds of the controls (equal compute, "
                    "attribution, failure modes)")
    ap.add_argument("--ablation-seeds", default=seed_list("ablation"), help="seeds of the ablations")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="override grpo.steps (default: the config's)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "experiment"),
                    help="summaries and (unless MLFLOW_TRACKING_URI is set) the MLflow store")
    ap.add_argument("--report", default=str(REPO / "docs" / "results.md"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (smoke tests: a tiny model, fewer eval problems)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's checkpoints (1.6 GiB per run here) to train it further")
    ap.add_argument("--replicates", default="", metavar="RUN,...",
                    help="finished runs (e.g. lanpo-s0,lanpo-s2) to run again into <out>/replicates, same code, "
                         "config, seed and MLflow store: the report sets each against its first run")
    ap.add_argument("--no-mechanism", action="store_true", help="skip bench/mechanism.py")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    if args.worker:
        variant, seed, steps = args.worker[0], int(args.worker[1]), None if args.worker[2] == "-" else int(args.worker[2])
        result = worker(variant, seed, steps, out, args.set)
        (out / f"{variant}-s{seed}.json").write_text(json.dumps(result, indent=1, default=str))
        return
    report_path = Path(args.report).resolve()
    if not args.report_only:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        replicates = []
        for name in [x.strip() for x in args.replicates.split(",") if x.strip()]:
            variant, _, seed = name.rpartition("-s")
            if variant not in VARIANTS or not seed.isdigit():
                raise SystemExit(f"--replicates: {name!r} is not VARIANT-sSEED with a variant of {', '.join(VARIANTS)}")
            replicates.append((variant, int(seed)))
        seeds = {"main": args.seeds, "control": args.control_seeds, "ablation": args.ablation_seeds}
        seeds = {group: [int(x) for x in text.split(",") if x.strip()] for group, text in seeds.items()}
        started = time.perf_counter()
        # the main comparison seed by seed (so an interrupted run leaves paired seeds), then controls, ablations
        for seed in seeds["main"]:
            run_job("base", seed, args.steps, out, args.set, args.keep_checkpoints)
            for v in variants:
                if VARIANTS[v][2] == "main":
                    run_job(v, seed, args.steps, out, args.set, args.keep_checkpoints)
        for group in ("control", "ablation"):
            for seed in seeds[group]:
                for v in variants:
                    if VARIANTS[v][2] == group:
                        run_job(v, seed, args.steps, out, args.set, args.keep_checkpoints)
        for variant, seed in replicates:
            run_job(variant, seed, args.steps, out / "replicates", args.set, args.keep_checkpoints)
        if not args.no_mechanism and not (out / "mechanism.json").exists():
            print(f"[{time.strftime('%H:%M:%S')}] mechanism check ...", flush=True)
            subprocess.call([sys.executable, str(REPO / "bench" / "mechanism.py"), "--out",
                             str(out / "mechanism.json")], cwd=REPO)
        print(f"all runs: {time.perf_counter() - started:.0f} s", flush=True)
    command = "bench/compare.py " + " ".join(sys.argv[1:])
    report(out, report_path, report_path.parent / "results" / "curves.png", command.strip())
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()
