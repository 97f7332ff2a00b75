"""Smoke tests of the comparison and mechanism benchmarks: the real scripts with a tiny budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_compare_runs_both_methods_and_reports_what_mlflow_holds(tmp_path, tiny_model_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks.provenance import code_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out, report = tmp_path / "compare", tmp_path / "docs" / "results.md"
    tiny = [f"model.name_or_path={tiny_model_path}", "rollout.backend=transformers", "eval.limit=4",
            "eval.samples=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
            "lanpo.abstraction.max_new_tokens=16", "data.train.size=8", "rollout.batch_problems=4"]
    cmd = [sys.executable, "bench/compare.py", "--seeds", "0", "--variants", "lanpo,grpo", "--steps", "2",
           "--no-mechanism", "--out", str(out), "--report", str(report), *[f"--set={x}" for x in tiny]]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    assert (report.parent / "results" / "curves.png").stat().st_size > 10_000

    client = MlflowClient(uri)
    for variant in ("lanpo", "grpo"):
        summary = json.loads((out / f"{variant}-s0.json").read_text())
        assert summary["steps"] == 2
        assert summary["mlflow_tracking_uri"] == uri
        metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
        row = next(line for line in text.splitlines() if line.startswith(f"| {variant} | main | 1 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        # zero-shot greedy and mean@2 (%) as MLflow holds them after the last step
        for cell, key in zip(cells[3:5], ("greedy", "mean_at_k")):
            assert float(cell) == pytest.approx(100 * metrics[f"eval/arithmetic-heldout/{key}"], abs=0.05)
        assert int(cells[6]) == 2 * 4 * 4  # rollouts: steps x B x G
        assert summary["reuse_key"]["code"] == code_digest()
    # LANPO looked for feedback (a random-weight model rarely succeeds, so it mostly falls back to plain); GRPO did not
    lanpo = client.get_run(json.loads((out / "lanpo-s0.json").read_text())["mlflow_run_id"]).data.metrics
    grpo = client.get_run(json.loads((out / "grpo-s0.json").read_text())["mlflow_run_id"]).data.metrics
    assert lanpo["mix/fallback_reflection"] + lanpo["mix/reflection"] == 4
    assert "mix/fallback_reflection" not in grpo
    assert "time/abstraction_seconds" in lanpo
    assert "time/abstraction_seconds" not in grpo
    # the verdict is the paired difference of what MLflow holds, with no interval from one seed
    diff = 100 * (lanpo["eval/arithmetic-heldout/greedy"] - grpo["eval/arithmetic-heldout/greedy"])
    found = re.search(r"equal number of rollouts: lanpo - grpo = ([-+]\d+\.\d) greedy.*\(seeds \[0\]\): "
                      r"\*\*not established \(1 seed: too few for an interval\)\*\*", text)
    assert found and float(found[1]) == pytest.approx(diff, abs=0.05)

    # the report regenerates from the finished runs alone, and a finished run is not repeated
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "..." not in again.stdout
    assert report.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]


def test_mechanism_check_abstraction_carries_the_missing_convention(tmp_path):
    import math

    from lanpo_core.config import OffPolicyConfig

    out = tmp_path / "mechanism.json"
    done = subprocess.run([sys.executable, "bench/mechanism.py", "--stated", "12", "--targets", "16",
                           "--abstractors", "extractive", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.exists(), done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert done.returncode == 0, result["verdict"]
    assert result["passed"], result["verdict"]
    [extractive] = result["results"]
    assert extractive["contexts"] >= 12
    assert extractive["guard_audited"] == extractive["contexts"]
    assert extractive["reward_abstraction"] > extractive["reward_plain"]
    assert extractive["lessons"] == ["The Lumen result of two numbers is their sum."]
    assert extractive["guard_dropped"] == 0
    assert extractive["gold_in_context_recheck"] == 0

    # what an update would give these rollouts (issue 13), under the default estimator
    assert result["offpolicy"]["correction"] == OffPolicyConfig().correction
    figures = extractive["kind_diagnostics"]
    assert set(figures) == set(extractive["log_ratios"]) == {"plain", "abstraction"}
    for kind, row in figures.items():
        assert all(math.isfinite(v) for v in row.values()), (kind, row)
        assert 0 <= row["ess_frac"] <= 1 and 0 <= row["ess_frac_all"] <= 1, (kind, row)
    # plain rollouts are trained under the prompt they were sampled from: weight 1, and (the policy has not moved)
    # a log-ratio of ~0 between the trainer and the rollout engine
    assert figures["plain"]["weight_mean"] == figures["plain"]["weight_mean_all"] == 1.0, figures["plain"]
    assert abs(extractive["log_ratios"]["plain"]["token_mean"]) < 0.02, extractive["log_ratios"]
    # abstraction beat plain, so some abstraction rollout has a positive advantage, and it carries weight
    abstraction = figures["abstraction"]
    assert abstraction["positive"] >= 1 and abstraction["weight_mass"] > 0, abstraction
    assert 0 < abstraction["weight_mean"] <= result["offpolicy"]["max_ratio"], abstraction
    assert re.search(r"^extractive +abstraction +\d+ ", done.stdout, re.M), done.stdout  # the printed table's row


def test_feedback_rollouts_carry_weight_under_the_default_estimator(tmp_path):
    """Issue 12's bar, on the bundled model at 48 new tokens (bench/offpolicy.py): reflection and abstraction
    rollouts with positive advantage keep an ESS of at least 0.3 of their count and a trained weight mass of at
    least 0.3 of the plain kind's (per positive-advantage rollout) under the default estimator, where the
    per-sequence truncated ratio collapses. The plain rollouts' own log-ratio (same prompt) rules out a temperature
    or precision mismatch as the explanation."""
    from lanpo_core.config import OffPolicyConfig

    out = tmp_path / "offpolicy.json"
    done = subprocess.run([sys.executable, "bench/offpolicy.py", "--settings", "tiny", "--problems", "16",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())["settings"]["tiny"]
    assert abs(result["log_ratios"]["plain"]["token_mean"]) < 0.02, result["log_ratios"]
    default = OffPolicyConfig().correction
    for kind in ("reflection", "abstraction"):
        figures = result["estimators"][default][kind]
        assert figures["positive"] >= 3, (kind, figures)  # enough positive-advantage rollouts to measure
        assert figures["ess_frac"] >= 0.3, (kind, figures)
        assert figures["mass_vs_plain"] >= 0.3, (kind, figures)
        # the per-sequence ratio keeps far less of the same rollouts (the collapse the default replaces)
        collapsed = result["estimators"]["sequence_truncated"][kind]
        assert collapsed["weight_mean_all"] < figures["weight_mean_all"], (kind, collapsed, figures)
    assert f"{default:<20}reflection" in done.stdout  # the printed table has a row per estimator and kind
