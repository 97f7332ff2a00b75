"""Benchmark: re-running a finished training flow completes from Prefect's cache.

Runs `lanpo train` twice with the same config, overrides and run name, each in a fresh process (as a user would),
in a scratch working directory, and reports the second run's wall time as a fraction of the first (goal: <= 5 %
for the default tiny-cpu run), plus whether the final checkpoint checksum is the same.

    .venv/bin/python bench/flow_cache.py                    # configs/tiny-cpu.yaml as shipped (the main job)
    .venv/bin/python bench/flow_cache.py --set grpo.steps=3 # shorter

Prints a table and writes bench/results/flow_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(workdir: Path, config: str, overrides: list[str]) -> tuple[float, dict]:
    code = ("import json, sys; from flows.train import lanpo_train; "
            "print('SUMMARY ' + json.dumps(lanpo_train(sys.argv[1], json.loads(sys.argv[2]), 'bench-cache')))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(workdir / "prefect"),
           "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, config, json.dumps(overrides)], cwd=workdir, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f"lanpo train failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
    return seconds, json.loads(line.removeprefix("SUMMARY "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lanpo-bench-cache-") as tmp:
        workdir = Path(tmp)
        first, summary1 = run_once(workdir, args.config, args.overrides)
        second, summary2 = run_once(workdir, args.config, args.overrides)
    result = {"config": args.config, "overrides": args.overrides, "first_seconds": round(first, 1),
              "second_seconds": round(second, 1), "second_over_first": round(second / first, 4),
              "same_checkpoint": summary1["checkpoint_checksum"] == summary2["checkpoint_checksum"],
              "steps": summary1["steps"], "goal": "second_over_first <= 0.05"}
    print(f"{'run':<8}{'wall s':>10}")
    print(f"{'first':<8}{first:>10.1f}")
    print(f"{'second':<8}{second:>10.1f}")
    print(f"second/first = {second / first:.3f} (goal <= 0.05); same final checkpoint: {result['same_checkpoint']}")
    out = REPO / "bench" / "results" / "flow_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
