"""Deployments on a real Prefect server: `lanpo services up`, a run triggered through the API as the UI does it,
the MLflow run it produces, and `lanpo services down` leaving no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lanpo(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_deployment_run_through_a_real_prefect_server(tmp_path, tiny_model_path):
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANPO_SERVICES_DIR": str(tmp_path / "services"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    up = lanpo("services", "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), env=env)
    pids = json.loads((tmp_path / "services" / "services.json").read_text()) if up.returncode == 0 else {}
    try:
        assert up.returncode == 0, up.stderr
        assert f"prefect_api: {api}" in up.stdout
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            deadline = time.monotonic() + 120  # the serve process registers the deployments once it is up
            names: set[str] = set()
            while time.monotonic() < deadline and len(names) < 3:
                with get_client(sync_client=True) as client:
                    names = {d.name for d in client.read_deployments()}
                time.sleep(1)
            assert names == {"lanpo", "grpo", "evaluate"}
            with get_client(sync_client=True) as client:
                schema = client.read_deployment_by_name("lanpo-train/grpo").parameter_openapi_schema
            assert {"config", "overrides", "run_name"} <= set(schema["properties"])
            overrides = [f"model.name_or_path={tiny_model_path}", "grpo.steps=1", "eval.limit=2", "eval.samples=1",
                         "rollout.backend=transformers", f"paths.runs_dir={tmp_path / 'runs'}",
                         "rollout.max_new_tokens=6", "eval.max_new_tokens=6"]
            flow_run = run_deployment("lanpo-train/grpo", parameters={"overrides": overrides, "run_name": "deployed"},
                                      timeout=600)
            assert flow_run.state.is_completed(), flow_run.state.message

        from mlflow import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("lanpo").experiment_id],
                                  filter_string=f"tags.prefect_flow_run_id = '{flow_run.id}'")
        assert len(runs) == 1
        run = runs[0]
        assert run.data.params["lanpo.rollout_mix.plain"] == "1.0"  # the grpo deployment's config
        assert run.data.metrics["mix/plain"] == 16.0
        assert "update/loss" in run.data.metrics
        assert {"summary.json", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        down = lanpo("services", "down", env=env)
    assert down.returncode == 0
    assert "prefect-server" in down.stdout
    time.sleep(1)
    assert [name for name, pid in pids.items() if alive(pid)] == []
