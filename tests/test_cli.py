"""The `lanpo` command line, run as users run it (a real subprocess), and the table that ends `lanpo train`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lanpo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_data_inspect_tiny_config():
    result = lanpo("data", "inspect", "configs/tiny-cpu.yaml", "--samples", "2")
    assert result.returncode == 0, result.stderr
    assert "train arithmetic-train: 20 problems" in result.stdout
    assert "eval  arithmetic-heldout: 42 problems" in result.stdout
    assert result.stdout.count("gold answers parsable: 100.0%") == 2
    assert result.stdout.count("What is") == 4


def test_data_inspect_reports_skipped_rows(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": "none"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {{format: gsm8k, path: d.jsonl}}\n  eval: []\n")  # path relative to config
    result = lanpo("data", "inspect", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "1 problems" in result.stdout
    assert "1 without gold" in result.stdout
    assert "skipped 1 row(s) with no gold answer (lines 2)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["config", "show", "--set", "grpo.lr=1"], "unknown key 'grpo.lr'"),
    (["config", "show", "configs/nope.yaml"], "config file not found"),
    (["data", "inspect", "--set", "data.train.format=gsm8k", "--set", "data.train.path=/nope.jsonl"],
     "data file not found: /nope.jsonl"),
    (["prepare", "--set", "model.name_or_path=./no/such/model"], "neither a bundled name"),
])
def test_user_errors_are_one_clear_line(args, message):
    result = lanpo(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_show_applies_overrides():
    result = lanpo("config", "show", "configs/grpo-tiny-cpu.yaml", "--set", "grpo.learning_rate=3e-6")
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 3.0e-06" in result.stdout
    assert "plain: 1.0" in result.stdout


def test_verify_scores_a_jsonl(tmp_path):
    rows = [{"response": "so \\boxed{7}", "answer": "7"}, {"response": "it is 8", "answer": "7"},
            {"response": "no idea", "answer": "7"}, {"response": "The answer is 1/2.", "answer": "0.5"}]
    src, out = tmp_path / "r.jsonl", tmp_path / "scored.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    result = lanpo("verify", str(src), "--out", str(out))
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"]["status"] for r in scored] == ["correct", "wrong", "no_answer", "correct"]
    assert "accuracy=0.5" in result.stdout
    src.write_text('{"text": "x", "answer": "1"}\n')
    bad = lanpo("verify", str(src))
    assert bad.returncode == 2
    assert "r.jsonl:1: no field 'response'" in bad.stderr


@pytest.mark.parametrize("command", [None, "mlflow ui --backend-store-uri sqlite:///m.db --port 5000"])
def test_the_final_table_links_the_mlflow_run(command):
    import io

    from flows.cli import _print_run
    from tasks.tracking import RunLink

    link = RunLink("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning", command)
    out = io.StringIO()
    _print_run({"steps": 1, "run_key": "r", "checkpoint": None, "mlflow_run_id": "abc",
                "mlflow_tracking_uri": "sqlite:///m.db", **link.summary(), "eval/b/mean_at_k": 0.5,
                "eval_before": {"eval/b/mean_at_k": 0.25}}, 60.0, None, out, 2)
    assert "  b mean@2   0.250   0.500" in out.getvalue().splitlines()  # k from eval.samples
    shown = [line for line in out.getvalue().splitlines() if line.startswith("  MLflow UI") or "then open" in line]
    assert shown == ([f"  MLflow UI   {command}", f"              then open {link.url}"] if command
                     else [f"  MLflow UI   {link.url}"])


@pytest.mark.slow
def test_prepare_main_job():
    result = lanpo("prepare")
    assert result.returncode == 0, result.stderr
    assert "policy:   smollm2-135m-instruct" in result.stdout
    assert "llama, 30 layers, hidden 576" in result.stdout
    assert "embedder: all-minilm-l6-v2 (dim 384" in result.stdout
    assert result.stdout.rstrip().endswith("ready.")


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (every process a command starts inherits its environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            pass
    return found


@pytest.mark.slow
def test_first_train_run_shows_only_lanpo_on_the_console(tmp_path):
    """`lanpo train` as on a new machine (a fresh Prefect home, lanpo's own defaults, the real model and vLLM engine,
    a tiny setting): the terminal shows lanpo's lines, the progress bar and the final table, library output goes to
    the run's log, and nothing is left running."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in {"PREFECT_LOGGING_LEVEL", "DO_NOT_TRACK",
                                                                 "MLFLOW_DISABLE_TELEMETRY",
                                                                 "PREFECT_SERVER_ANALYTICS_ENABLED"}}
    env.update(PREFECT_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tiny = ["grpo.steps=1", "eval.limit=2", "eval.samples=1", "rollout.batch_problems=2", "rollout.max_new_tokens=8",
            "eval.max_new_tokens=8", "lanpo.abstraction.max_new_tokens=16"]
    cmd = [str(Path(sys.executable).with_name("lanpo")), "train", *[f"--set={x}" for x in tiny]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=900)
    logs = list(tmp_path.glob("runs/*/lanpo.log"))
    assert proc.returncode == 0, out + err + "".join(log.read_text()[-3000:] for log in logs)

    console = out + err
    assert "Traceback" not in console
    assert not re.search(r"warning|telemetry", console, re.IGNORECASE), console
    assert re.search(r"step 1/1 update-policy.*reward \d\.\d\d, held-out \d\.\d\d", err)
    rows = re.findall(r"^  arithmetic-heldout (greedy|mean@1) +(\S+) +(\S+)$", out, re.MULTILINE)
    assert sorted(kind for kind, _, _ in rows) == ["greedy", "mean@1"], out
    assert all(0 <= float(x) <= 1 for _, before, after in rows for x in (before, after))
    assert re.search(r"^  update +\d+\.\d$", out, re.MULTILINE)
    assert re.search(r"^  total +\d+\.\d$", out, re.MULTILINE)
    assert Path(re.search(r"^  checkpoint  (\S+)$", out, re.MULTILINE).group(1)).is_dir()
    assert re.search(r"^  MLflow UI   \S*mlflow ui --backend-store-uri sqlite:///\S+mlflow.db --port 5000$", out,
                     re.MULTILINE)
    log = Path(re.search(r"^  log +(\S+)$", out, re.MULTILINE).group(1))
    assert logs == [log]  # library output went there
    assert "Starting temporary server" in log.read_text()

    deadline = time.monotonic() + 15  # vLLM's watchdog and the Prefect server stop within seconds of the exit
    while _processes_with(str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(str(home)) == []
