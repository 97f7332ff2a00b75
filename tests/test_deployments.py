"""Deployments on a real Prefect server: `lanpo services up`, a run triggered through the API as the UI does it,
the MLflow run it produces and the links between the two UIs, and `lanpo services down` leaving no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lanpo(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


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
    mlflow_ui, prefect_ui = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANPO_SERVICES_DIR": str(tmp_path / "services"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_LOGGING_LEVEL": "INFO"}  # the flow's own lines reach the server's log
    up = lanpo("services", "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), env=env)
    state = json.loads((tmp_path / "services" / "services.json").read_text()) if up.returncode == 0 else {}
    pids = state.get("pids", {})
    try:
        assert up.returncode == 0, up.stderr
        assert f"prefect_api: {api}" in up.stdout
        assert state["mlflow_ui"] == {"url": mlflow_ui, "store": env["MLFLOW_TRACKING_URI"]}
        # the MLflow server runs without its job runner (and its huey workers)
        server = [" ".join(p.cmdline()) for p in psutil.Process(pids["mlflow-ui"]).children(recursive=True)]
        assert server and not [c for c in server if "mlflow.server.jobs" in c or "huey" in c], server
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
            from test_flows import markdown_artifacts

            (artifact,) = markdown_artifacts(flow_run.id)
            with get_client(sync_client=True) as client:
                from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

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

        # Prefect -> MLflow: the artifact and the flow's first line link the run's page on the UI services up serves.
        page = (f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                "?workflowType=machine_learning")
        assert f"MLflow run: [{page}]({page})\n" in artifact
        ours = [log.message for log in sorted(logs, key=lambda log: log.timestamp) if log.task_run_id is None
                and log.message.startswith(("run ", "step "))]
        assert ours[0].endswith(f"; MLflow run {page}"), ours
        assert get(page)[0] == 200  # the UI's page (the part after # is the browser's)
        status, body = get(f"{mlflow_ui}/ajax-api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        assert status == 200 and json.loads(body)["run"]["info"]["experiment_id"] == run.info.experiment_id
        # ... and the same server as the tracking URI links to its own UI
        from lanpo_core.config import build_config
        from tasks.tracking import run_link

        assert run_link(build_config({}, [f"tracking.mlflow_tracking_uri={mlflow_ui}"]), run.info.run_id).url == page
        # MLflow -> Prefect: the run's description links the flow run's page in the Prefect UI
        flow_run_page = f"{prefect_ui}/runs/flow-run/{flow_run.id}"
        assert f"[{flow_run.name}]({flow_run_page})" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["prefect_flow_run_url"] == flow_run_page
        assert get(flow_run_page)[0] == 200
        assert run.data.tags["mlflow.source.name"] == "lanpo-train"
    finally:
        down = lanpo("services", "down", env=env)
    assert down.returncode == 0
    assert "prefect-server" in down.stdout
    time.sleep(1)
    assert [name for name, pid in pids.items() if alive(pid)] == []
