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


def test_the_config_is_one_param_per_field_and_the_overrides_one_tag_per_key(store):
    from mlflow import MlflowClient

    from lanpo_core.config import build_config
    from tasks import tracking

    overrides = ["grpo.steps=3", "eval.samples=2", "data.eval=[{name: a, size: 5}, {name: b, size: 7}]"]
    cfg = build_config({}, overrides)
    client = MlflowClient(store)
    run_id = client.create_run(tracking.experiment_id(_cfg(store))).info.run_id
    tracking.log_params(run_id, cfg.flat())
    client.set_tag(run_id, "x", "y")
    for key, value in tracking.override_tags(overrides).items():
        client.set_tag(run_id, key, value)
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert len(params) == len(cfg.flat()) > 100  # more than one batch
    # a list of sections: each field its own param, lined up across runs whatever the other entries
    assert (params["data.eval.0.name"], params["data.eval.0.size"], params["data.eval.1.name"]) == ("a", "5", "b")
    assert "data.eval" not in params
    assert json.loads(params["verify.extraction"]) == ["boxed", "hashes", "answer_is", "last_number"]
    assert (params["eval.samples"], params["grpo.steps"], params["eval.limit"]) == ("2", "3", "")
    assert tags["overrides"] == " ".join(overrides)
    assert (tags["override.grpo.steps"], tags["override.eval.samples"]) == ("3", "2")
    assert tags["override.data.eval"] == "[{name: a, size: 5}, {name: b, size: 7}]"


def test_tables_take_each_step_once_and_the_yaml_keeps_real_newlines(store, tmp_path):
    import yaml
    from mlflow import MlflowClient

    from lanpo_core.data import Problem
    from lanpo_core.feedback import FeedbackBatch, FeedbackContext
    from lanpo_core.step import Rollout
    from tasks import tracking

    client = MlflowClient(store)
    run_id = client.create_run(tracking.experiment_id(_cfg(store))).info.run_id
    problems = [Problem("p1", "What is 2+3?", "5", "arith"), Problem("p2", "What is 4-1?", "3", "arith")]
    context = "Earlier attempts at this problem:\nAttempt 1: 6\nAttempt 2: 5"
    feedback = FeedbackBatch({("p1", "reflection"): FeedbackContext("p1", "reflection", [], ("u1",), context)})

    def rollout(pid: str, kind: str, index: int, text: str, reward: float) -> Rollout:
        return Rollout(pid, kind, index, ["u1"] if kind != "plain" else [], text, [1, 2], [3, 4, 5], [-0.1] * 3,
                       "stop", 0, reward, "correct" if reward else "wrong", text[-1])

    rollouts = [rollout("p1", "plain", 0, "2+3 is\n5", 1.0), rollout("p1", "reflection", 1, "so 6", 0.0),
                rollout("p2", "plain", 0, "3", 1.0)]
    rows = tracking.completion_rows(problems, rollouts, feedback, limit=2)
    assert [(r["question"], r["gold"], r["kind"], r["context"], r["response"], r["extracted"], r["reward"])
            for r in rows] == [("What is 2+3?", "5", "plain", None, "2+3 is\n5", "5", 1.0),
                               ("What is 2+3?", "5", "reflection", context, "so 6", "6", 0.0)]
    tracking.log_completions(run_id, rows, step=1)
    tracking.log_completions(run_id, rows, step=1)  # the stage repeated after a crash: not appended again
    tracking.log_completions(run_id, tracking.completion_rows(problems, rollouts[2:], feedback, 16), step=2)

    table = json.loads(open(client.download_artifacts(run_id, "completions.json", str(tmp_path))).read())
    assert table["columns"][:4] == ["step", "problem_id", "question", "gold"]
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["step"], r["problem_id"], r["kind"]) for r in records] == [(1, "p1", "plain"), (1, "p1", "reflection"),
                                                                          (2, "p2", "plain")]
    assert [r["gold"] for r in records] == ["5", "5", "3"]  # still text after an append, as the pool holds it
    assert records[1]["context"] == context  # the newlines themselves, not `\n` escapes, once read
    tagged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert tagged == [{"path": "completions.json", "type": "table"}]  # one table, shown as such by the UI

    text = open(client.download_artifacts(run_id, "rollouts/step-00001.yaml", str(tmp_path))).read()
    assert "context: |-\n    Earlier attempts at this problem:\n    Attempt 1: 6\n" in text
    assert yaml.safe_load(text) == rows


def test_predictions_are_a_table_with_question_and_gold(store, tmp_path):
    from mlflow import MlflowClient

    from lanpo_core.evaluate import Prediction
    from tasks import tracking

    client = MlflowClient(store)
    run_id = client.create_run(tracking.experiment_id(_cfg(store))).info.run_id
    path = tmp_path / "step-00000.jsonl"
    predictions = [Prediction("bench", "p1", "What is 2+3?", "5", "greedy", 0, "it is 5", "5", "correct", 1.0),
                   Prediction("bench", "p2", "What is 4-1?", "3", "sampled", 1, "2", "2", "wrong", 0.0)]
    path.write_text("".join(json.dumps(p.as_dict()) + "\n" for p in predictions))
    tracking.log_predictions(run_id, path, step=0)
    table = json.loads(open(client.download_artifacts(run_id, "eval/predictions.json", str(tmp_path / "t"))).read())
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["step"], r["question"], r["gold"], r["mode"], r["response"], r["reward"]) for r in records] == [
        (0, "What is 2+3?", "5", "greedy", "it is 5", 1.0), (0, "What is 4-1?", "3", "sampled", "2", 0.0)]
    assert "eval/step-00000.jsonl" in {a.path for a in client.list_artifacts(run_id, "eval")}
