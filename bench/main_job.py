"""Benchmark: the README's main job (`lanpo train --config configs/tiny-cpu.yaml`) from a set-up environment.

Runs the real command once in a scratch working directory (fresh runs folder, MLflow store and PREFECT_HOME, so
nothing comes from a cache), then reads the per-step stage times back from the run's MLflow store and prints:
wall time against the goal, time by stage, and the update stage against its FLOP estimate at this machine's measured
fp32 matmul rate (forward + backward = 6 x matmul parameters x tokens run).

    .venv/bin/python bench/main_job.py                       # the main job as shipped
    .venv/bin/python bench/main_job.py --emulate-avx2        # as on a CPU without native bf16 (oneDNN/ATen capped)
    .venv/bin/python bench/main_job.py --set grpo.steps=2    # shorter

`--emulate-avx2` caps oneDNN and ATen at AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY) for the job and the matmul
probe: bf16 then runs on PyTorch's slow fallback, as on an AVX2-only EPYC, and `auto` precision must pick fp32.
Prints a table and writes bench/results/main_job[-avx2].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 8 * 60
GOAL_UPDATE_RATIO = 1.5
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
STAGES = ("reflection", "abstraction", "generate", "verify", "pool", "update", "sync", "eval", "eval_feedback")

PROBE = r"""
import json, time, torch
from lanpo_core import hardware
def rate(dtype, m=512, k=576, n=1536):  # a SmolLM2-135M MLP projection over 512 tokens
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.5:
        a @ b
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9
support = hardware.bf16_support()
print(json.dumps({"fp32_gflops": rate(torch.float32), "bf16_gflops": rate(torch.bfloat16),
                  "threads": torch.get_num_threads(), "cpu": hardware.cpu_name(),
                  "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
                  "amx": bool(torch.cpu._is_amx_tile_supported()), "bf16_native": support.native,
                  "reason": support.reason}))
"""


def matmul_probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_params(model_path: str) -> int:
    """Parameters that take part in a matmul per token: every linear layer plus the (tied) LM head."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size


def stage_times(tracking_uri: str) -> tuple[dict[str, dict[int, float]], dict[int, float], dict]:
    """Per stage, per step seconds; trained tokens (prompt + completion) per step; and the run's params."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("lanpo")
    run = client.search_runs([exp.experiment_id], max_results=1)[0]
    stages: dict[str, dict[int, float]] = defaultdict(dict)
    for stage in STAGES:
        # the latest value per step: a stage repeated after a crash logs its step again
        history = sorted(client.get_metric_history(run.info.run_id, f"time/{stage}_seconds"), key=lambda m: m.timestamp)
        for m in history:
            stages[stage][m.step] = m.value
    tokens: dict[int, float] = defaultdict(float)
    for name in ("update/tokens/trained", "update/tokens/prompt_trained"):
        for m in client.get_metric_history(run.info.run_id, name):
            tokens[m.step] += m.value
    return stages, tokens, run.data.params


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--emulate-avx2", action="store_true", help="Cap oneDNN/ATen at AVX2 (no native bf16).")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/main_job[-avx2].json).")
    args = parser.parse_args()

    env = {**os.environ, **(AVX2_ENV if args.emulate_avx2 else {})}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    probe = matmul_probe(env)
    print(f"CPU {probe['cpu']} (avx512_bf16 {probe['avx512_bf16']}, amx {probe['amx']}"
          f"{', emulating AVX2' if args.emulate_avx2 else ''}); matmul {probe['fp32_gflops']:.1f} GFLOP/s fp32, "
          f"{probe['bf16_gflops']:.1f} bf16 on {probe['threads']} threads; auto precision: "
          f"{'bf16' if probe['bf16_native'] else 'fp32'} ({probe['reason']})")

    lanpo = str(Path(sys.executable).parent / "lanpo")
    cmd = [lanpo, "train", "--config", args.config, *[f"--set={o}" for o in args.overrides]]
    with tempfile.TemporaryDirectory(prefix="lanpo-bench-main-") as tmp:
        work = Path(tmp)
        env["PREFECT_HOME"] = str(work / "prefect-home")  # a fresh machine's Prefect database
        log_path = work / "console.log"
        load_before = load_average()
        started = time.perf_counter()
        with open(log_path, "w") as console:
            job = subprocess.Popen(cmd, cwd=work, env=env, stdout=console, stderr=subprocess.STDOUT)
            peak_rss = peak_tree_rss(job)
        wall = time.perf_counter() - started
        load_after = load_average()
        if job.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({job.returncode}):\n{log_path.read_text()[-4000:]}")
        stages, tokens, params = stage_times(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")

    from lanpo_core.config import load_config
    from lanpo_core.models import resolve_policy

    cfg = load_config(args.config, args.overrides)
    n_params = matmul_params(resolve_policy(cfg.model.name_or_path, cfg.paths.cache_dir).path)
    update_s = sum(stages["update"].values())
    flops = 6 * n_params * sum(tokens.values())
    ideal_s = flops / (probe["fp32_gflops"] * 1e9)
    ratio = update_s / ideal_s if ideal_s else float("nan")
    staged = sum(sum(v.values()) for v in stages.values())

    print(f"\n{'stage':<15}{'total s':>9}{'per step s':>12}{'share':>8}")
    for stage in STAGES:
        if stages.get(stage):
            total = sum(stages[stage].values())
            print(f"{stage:<15}{total:>9.1f}{total / len(stages[stage]):>12.2f}{total / wall:>8.1%}")
    print(f"{'(outside)':<15}{wall - staged:>9.1f}{'':>12}{(wall - staged) / wall:>8.1%}"
          "   start-up, model loads, engine start, Prefect and MLflow")
    print(f"\nwall {wall:.1f} s = {wall / 60:.2f} min (goal <= {GOAL_SECONDS / 60:.0f} min: "
          f"{'met' if wall <= GOAL_SECONDS else f'missed by {wall - GOAL_SECONDS:.0f} s'})")
    print(f"update: {update_s:.1f} s for {sum(tokens.values()):.0f} trained tokens = {flops / 1e12:.2f} TFLOP; at "
          f"{probe['fp32_gflops']:.1f} GFLOP/s fp32 that is {ideal_s:.1f} s: ratio {ratio:.2f} "
          f"(goal <= {GOAL_UPDATE_RATIO})")
    print(f"peak memory (resident, the job's processes together): {peak_rss / 2**30:.2f} GiB")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after; precision params: "
          + ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k.startswith("precision/")))

    result = {"cpu": probe, "emulate_avx2": args.emulate_avx2, "config": args.config, "overrides": args.overrides,
              "wall_seconds": round(wall, 1), "goal_seconds": GOAL_SECONDS, "goal_met": wall <= GOAL_SECONDS,
              "stages": {k: {str(s): round(t, 3) for s, t in sorted(v.items())} for k, v in stages.items()},
              "stage_totals": {k: round(sum(v.values()), 2) for k, v in stages.items()},
              "outside_stages_seconds": round(wall - staged, 1), "update_tokens": sum(tokens.values()),
              "matmul_params": n_params, "update_flops": flops, "update_ideal_seconds": round(ideal_s, 2),
              "update_over_flop_estimate": round(ratio, 3), "goal_update_ratio": GOAL_UPDATE_RATIO,
              "load_average_before": load_before, "load_average_after": load_after,
              "peak_rss_gib": round(peak_rss / 2**30, 2),
              "precision": {k: v for k, v in params.items() if k.startswith(("precision/", "hardware/"))}}
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        "main_job-avx2.json" if args.emulate_avx2 else "main_job.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def peak_tree_rss(job: subprocess.Popen, every: float = 0.5) -> int:
    """Wait for `job`; the largest resident memory of it and its descendants together, sampled every `every` s."""
    import psutil

    root, peak = psutil.Process(job.pid), 0
    while job.poll() is None:
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(every)
    return peak


if __name__ == "__main__":
    main()
