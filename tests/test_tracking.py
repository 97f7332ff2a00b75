"""MLflow tracking without a flow: the experiment's kind, links to a run's page for each kind of store, and which
MLflow UI `lanpo services up` serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture()
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _cfg(store: str, experiment: str = "lanpo"):
    from lanpo_core.config import build_config

    return build_config({}, [f"tracking.mlflow_tracking_uri={store}", f"tracking.experiment={experiment}"])


def test_experiments_are_tagged_model_training_unless_they_have_a_kind(store):
    from mlflow import MlflowClient

    from tasks import tracking

    client = MlflowClient(store)
    new = tracking.experiment_id(_cfg(store, "new"))
    old = client.create_experiment("old")  # as lanpo created them before
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment_id(_cfg(store, "old")) == old
    tracking.experiment_id(_cfg(store, "chosen"))
    kinds = {e: client.get_experiment(e).tags.get("mlflow.experimentKind") for e in (new, old, chosen)}
    assert kinds == {new: "custom_model_development", old: "custom_model_development", chosen: "genai_development"}


def test_run_link_is_the_served_ui_or_the_command_that_starts_one(store, tmp_path):
    from mlflow import MlflowClient

    from tasks import tracking

    cfg = _cfg(store)
    experiment = tracking.experiment_id(cfg)
    run_id = MlflowClient(store).create_run(experiment).info.run_id
    page = f"/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"

    served = tracking.run_link(cfg, run_id, (store, "http://127.0.0.1:5123/"))
    assert (served.url, served.command) == (f"http://127.0.0.1:5123{page}", None)
    assert served.summary() == {"mlflow_run_url": served.url}
    for elsewhere in (None, (f"sqlite:///{tmp_path / 'other.db'}", "http://127.0.0.1:5123")):
        link = tracking.run_link(cfg, run_id, elsewhere)
        assert link.url == f"http://127.0.0.1:5000{page}"
        assert link.command.endswith(f"mlflow ui --backend-store-uri {store} --port 5000")
        assert link.summary() == {"mlflow_run_url": link.url, "mlflow_ui_command": link.command}
        assert link.markdown() == f"[{link.url}]({link.url}) once an MLflow UI runs: `{link.command}`"


def test_served_mlflow_ui_only_while_it_runs(tmp_path, monkeypatch):
    from flows import serve

    monkeypatch.setattr(serve, "STATE_FILE", tmp_path / "services.json")
    assert serve.served_mlflow_ui() is None  # no services
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, expected in ((dead.pid, None), (os.getpid(), ("sqlite:///x.db", "http://127.0.0.1:5123"))):
        serve.STATE_FILE.write_text(json.dumps({"pids": {"mlflow-ui": pid},
                                                "mlflow_ui": {"url": "http://127.0.0.1:5123", "store": "sqlite:///x.db"}}))
        assert serve.served_mlflow_ui() == expected
    serve.STATE_FILE.write_text(json.dumps({"pids": {"mlflow-ui": os.getpid()}}))  # UI still starting
    assert serve.served_mlflow_ui() is None
