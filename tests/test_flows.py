"""The training and evaluation flows, run for real: ephemeral Prefect API, SQLite MLflow store, LanceDB pool,
transformers forward/backward passes (tiny random-weight model; the real SmolLM2 in the slow tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(model: str, runs: Path, steps: int = 2) -> list[str]:
    return [f"model.name_or_path={model}", f"grpo.steps={steps}", "eval.every=0", "eval.limit=4", "eval.samples=1",
            "rollout.backend=transformers", f"paths.runs_dir={runs}", "rollout.max_new_tokens=8",
            "eval.max_new_tokens=8", "lanpo.abstraction.max_new_tokens=16", "lanpo.abstraction.min_similarity=0.3"]


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_states(flow_run_id) -> list[tuple[str, str]]:
    """(stage, state) of each task run; runs are named `<stage>-step<k>` (evaluation: `-after<k>`)."""
    return sorted((r.name.rsplit("-", 1)[0], r.state.name) for r in task_runs(flow_run_id))


def markdown_artifacts(flow_run_id) -> list[str]:
    """The markdown of a flow run's markdown artifacts (not its result records)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["markdown"])))
    return [a.data for a in found]


def expected_datasets(cfg, contexts: dict[int, str]) -> dict[str, tuple[str, str]]:
    """{name: (digest, context)} of the config's problem sets (0: the training set, then `data.eval`)."""
    from lanpo_core.data import load_problems
    from lanpo_core.runtime import data_dir
    from tasks.provenance import data_digest

    sets = [load_problems(spec, data_dir(cfg)) for spec in [cfg.data.train, *cfg.data.eval]]
    return {sets[i].name: (data_digest([(sets[i].name, sets[i].problems)])[:16], context)
            for i, context in contexts.items()}


def run_datasets(run) -> dict[str, tuple[str, str]]:
    return {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in run.inputs.dataset_inputs}


def test_train_flow_runs_tracks_and_completes_from_cache(tmp_path, tiny_model_path, mlflow_store, monkeypatch):
    from mlflow import MlflowClient

    from flows.train import lanpo_train
    from lanpo_core.config import load_config
    from lanpo_core.data import load_problems
    from lanpo_core.pool import ExperiencePool
    from lanpo_core.runtime import data_dir

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # samples within a run of seconds
    overrides = tiny_overrides(tiny_model_path, tmp_path / "runs") + ["eval.feedback=true"]
    state = lanpo_train("configs/tiny-cpu.yaml", overrides, "flow-test", return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["steps"] == 2
    assert Path(summary["checkpoint"]).is_dir()
    first = task_states(state.state_details.flow_run_id)
    stages = ["build-feedback", "evaluate-policy", "generate-rollouts", "score-rollouts", "update-policy",
              "write-pool"]
    assert sorted({name for name, _ in first}) == stages
    assert {s for _, s in first} == {"Completed"}
    names = {r.name for r in task_runs(state.state_details.flow_run_id)}
    # named by the step counted from 1, as in MLflow: step 2's update makes the policy evaluated after it
    assert {"build-feedback-step1", "update-policy-step2", "evaluate-policy-after0", "evaluate-policy-after2"} <= names, names

    # The pool holds every rollout of both steps: B=4 problems x G=4 x 2 steps.
    pool = ExperiencePool(Path(summary["run_dir"]) / "pool", run_id=summary["run_key"], read_only=True)
    assert pool.count() == 32
    assert pool.count(step=1) == 16

    client = MlflowClient()
    cfg = load_config("configs/tiny-cpu.yaml", overrides)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["rollout.num_generations"] == "4"
    assert (run.data.params["data.eval.0.name"], run.data.params["eval.samples"]) == ("arithmetic-heldout", "1")
    assert (run.data.tags["override.grpo.steps"], run.data.tags["override.eval.feedback"]) == ("2", "true")
    assert run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.metrics["pool/rows"] == 32.0
    # MLflow step t: training step t (from 1) and the evaluation of the policy its update made; 0: the base policy
    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    assert steps("mix/plain") == steps("update/loss") == [1, 2]
    assert steps("eval/arithmetic-heldout/greedy") == steps("eval/arithmetic-heldout/mean_at_k") == [0, 2]
    assert not [k for k in run.data.metrics if k.startswith("eval/") and "mean_at_" in k and "mean_at_k" not in k]
    assert "update/loss" in run.data.metrics
    assert "eval/arithmetic-heldout/greedy" in run.data.metrics
    for stage in ("reflection", "abstraction", "generate", "verify", "pool", "update", "sync", "eval",
                  "eval_feedback"):
        assert run.data.metrics[f"time/{stage}_seconds"] > 0
    # Feedback-augmented evaluation: one greedy answer per test problem, recomputable from the saved predictions.
    from lanpo_core.evaluate import accuracy_from_predictions

    predictions = [json.loads(x) for x in (Path(summary["run_dir"]) / "eval" / "step-00002.jsonl").open()]
    feedback = [p for p in predictions if p["mode"] == "feedback_greedy"]
    assert len(feedback) == 4
    assert {p["mode"] for p in predictions} == {"sampled", "greedy", "feedback_greedy"}
    recomputed = accuracy_from_predictions(predictions)
    for key in ("feedback_greedy", "feedback_coverage", "greedy", "mean_at_k"):
        assert run.data.metrics[f"eval/arithmetic-heldout/{key}"] == pytest.approx(recomputed[f"eval/arithmetic-heldout/{key}"])
    assert run.data.metrics["eval/arithmetic-heldout/feedback_coverage"] == sum(p["context"] for p in feedback) / 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json", "curves.png", "rollouts", "eval"} <= artifacts

    # Linked both ways with no UI running: the Prefect artifact gives the command that starts one on this store and
    # the run's page on it; the MLflow run's description names the flow run on the ephemeral API.
    flow_run_id = str(state.state_details.flow_run_id)
    experiment = run.info.experiment_id
    page = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert summary["mlflow_run_url"] == page
    assert summary["mlflow_ui_command"].endswith(f"mlflow ui --backend-store-uri {mlflow_store} --port 5000")
    (artifact,) = markdown_artifacts(state.state_details.flow_run_id)
    assert f"MLflow run: [{page}]({page}) once an MLflow UI runs: `{summary['mlflow_ui_command']}`" in artifact
    note = run.data.tags["mlflow.note.content"]
    assert f"id `{flow_run_id}`" in note and "ephemeral API" in note and f"/runs/flow-run/{flow_run_id}" in note
    assert (run.data.tags["mlflow.source.name"], run.data.tags["mlflow.source.type"]) == ("lanpo-train", "JOB")
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run_datasets(run) == expected_datasets(cfg, {0: "training", 1: "evaluation"})
    assert run.data.metrics["system/cpu_utilization_percentage"] >= 0
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # every rollout of both steps (B x G = 16 = tracking.log_rollout_samples), readable: question, gold, context
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "completions.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["step"] for r in rows] == [1] * 16 + [2] * 16
    gold = {p.id: (p.question, p.answer) for p in load_problems(cfg.data.train, data_dir(cfg)).problems}
    assert all((r["question"], r["gold"]) == gold[r["problem_id"]] for r in rows)
    assert {r["kind"] for r in rows} <= {"plain", "reflection", "abstraction"}
    assert all((r["context"] is None) == (r["kind"] == "plain") for r in rows)
    pool_rows = ExperiencePool(Path(summary["run_dir"]) / "pool", run_id=summary["run_key"],
                               read_only=True).table.to_pandas()
    assert sorted((r["problem_id"], r["rollout_index"], r["response"], r["reward"]) for r in rows) == sorted(
        pool_rows[["problem_id", "rollout_index", "response", "reward"]].itertuples(index=False, name=None))
    import yaml

    step2 = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "rollouts/step-00002.yaml",
                                                          str(tmp_path))).read_text())
    assert step2 == [{k: v for k, v in r.items() if k != "step"} for r in rows[16:]]
    # the predictions of both evaluations, with question and gold answer
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/predictions.json",
                                                      str(tmp_path))).read_text())
    shown = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {r["step"] for r in shown} == {0, 2}
    assert [(r["question"], r["gold"], r["response"]) for r in shown if r["step"] == 2] == [
        (p["question"], p["gold"], p["response"]) for p in predictions]

    # Stage results are JSON (tasks/serializer.py), not pickles that could run code when a resumed run loads them.
    results = sorted((Path(summary["run_dir"]) / "prefect-results").iterdir())
    assert len(results) >= 11  # 5 stages x 2 steps + the evaluation
    for path in results:
        record = json.loads(path.read_text())
        assert record["metadata"]["serializer"]["type"] == "lanpo-json", path

    # Same parameters again: every stage comes from the cache, nothing changes, the MLflow run is reused.
    again = lanpo_train("configs/tiny-cpu.yaml", overrides, "flow-test", return_state=True)
    assert again.is_completed()
    assert {s for _, s in task_states(again.state_details.flow_run_id)} == {"Cached"}
    assert again.result()["checkpoint_checksum"] == summary["checkpoint_checksum"]
    assert again.result()["mlflow_run_id"] == summary["mlflow_run_id"]
    assert ExperiencePool(Path(summary["run_dir"]) / "pool", run_id=summary["run_key"]).count() == 32

    shown = subprocess.run([sys.executable, "-m", "flows.cli", "pool", "show", summary["run_dir"]], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "32 rollouts of 8 problems over 2 steps" in shown.stdout


@pytest.mark.parametrize("extra, message", [
    (["grpo.lr=1"], "unknown key 'grpo.lr'"),
    (["data.train.format=gsm8k", "data.train.path=/no/such/file.jsonl"], "data file not found: /no/such/file.jsonl"),
    (["model.name_or_path=/no/such/model"], "neither a bundled name"),
    # a hub name on a machine without hub access: refused by one cache lookup or request, not minutes of retries
    (["model.name_or_path=nobody/no-such-model"], "could not load 'nobody/no-such-model' from the hub"),
])
def test_bad_input_fails_the_flow_before_any_stage(tmp_path, tiny_model_path, mlflow_store, extra, message):
    from flows.train import lanpo_train

    started = time.perf_counter()
    state = lanpo_train("configs/tiny-cpu.yaml", tiny_overrides(tiny_model_path, tmp_path / "runs") + extra,
                        "bad", return_state=True)
    assert time.perf_counter() - started < 60  # the flow's own start-up included
    assert state.is_failed()
    assert message in state.message or message in str(state.result(raise_on_failure=False))
    assert task_states(state.state_details.flow_run_id) == []
    assert not (tmp_path / "runs").exists()


def test_evaluate_flow_predictions_agree_with_metrics(tmp_path, tiny_model_path, mlflow_store, monkeypatch):
    from mlflow import MlflowClient

    from flows.evaluate import lanpo_evaluate
    from lanpo_core.config import load_config
    from lanpo_core.evaluate import accuracy_from_predictions

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # would sample, but they are turned off
    overrides = [f"paths.runs_dir={tmp_path}", "eval.limit=6", "eval.samples=2", "eval.max_new_tokens=6",
                 "rollout.backend=transformers", "tracking.system_metrics=false"]
    state = lanpo_evaluate("configs/tiny-cpu.yaml", tiny_model_path, overrides, return_state=True)
    summary = state.result()
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert f"id `{state.state_details.flow_run_id}`" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.name"] == "lanpo-evaluate"
    assert (run.info.status, run.data.tags["lanpo_kind"], run.data.params["rollout.backend"]) == (
        "FINISHED", "evaluation", "transformers")
    assert f"/runs/{run.info.run_id}?" in summary["mlflow_run_url"]
    assert run_datasets(run) == expected_datasets(load_config("configs/tiny-cpu.yaml", overrides), {1: "evaluation"})
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    rows = [json.loads(line) for line in open(summary["predictions"])]
    assert len(rows) == 6 * 2 + 6
    recomputed = accuracy_from_predictions(rows)
    for key, value in recomputed.items():
        assert summary[key] == pytest.approx(value)
    assert "eval/arithmetic-heldout/mean_at_k" in recomputed  # k is the param eval.samples
    assert (run.data.params["eval.samples"], run.data.tags["override.eval.samples"]) == ("2", "2")
    table = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "eval/predictions.json",
                                                              str(tmp_path))).read_text())
    shown = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["step"], r["question"], r["gold"], r["status"]) for r in shown] == [
        (0, r["question"], r["gold"], r["status"]) for r in rows]


# ------------------------------------------------------------------------------------------- crash and resume
def _pool_rows(run_dir: Path, run_key: str) -> list[tuple]:
    from lanpo_core.pool import ExperiencePool

    table = ExperiencePool(run_dir / "pool", run_id=run_key, read_only=True).table.to_pandas()
    table = table[table["run_id"] == run_key]
    cols = ["step", "problem_id", "rollout_index", "kind", "response", "reward"]
    return sorted(tuple(r) for r in table[cols].itertuples(index=False))


def _spawn_train(overrides: list[str], run_name: str, env: dict) -> subprocess.Popen:
    code = ("import sys, json; from flows.train import lanpo_train; "
            "print(json.dumps(lanpo_train('configs/tiny-cpu.yaml', json.loads(sys.argv[1]), sys.argv[2])))")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(overrides), run_name], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


KILL_OVERRIDES = ["grpo.steps=2", "eval.every=0", "eval.limit=2", "eval.samples=1", "eval.greedy=false",
                  "rollout.backend=transformers", "rollout.batch_problems=2", "rollout.num_generations=4",
                  "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "lanpo.abstraction.max_new_tokens=24",
                  "lanpo.abstraction.min_similarity=0.3", "grpo.bf16=false", "grpo.learning_rate=1e-4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smollm2_path):
    """The reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    overrides = KILL_OVERRIDES + [f"paths.runs_dir={root / 'runs'}"]
    reference = _spawn_train(overrides, "reference", env)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0
    return root, env, overrides, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["checkpoint-1", "pool-3"])
def test_killed_flow_resumes_to_the_same_weights_and_pool(uninterrupted, kill_when):
    """SIGKILL mid-run (once step 0's checkpoint is written / once the pool has its third version), restart: the
    final weights and pool equal those of an uninterrupted run. Real SmolLM2, so that updates change the weights."""
    root, env, overrides, ref = uninterrupted
    name = f"victim-{kill_when}"
    victim = _spawn_train(overrides, name, env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and victim.poll() is None:
        dirs = list((root / "runs").glob(f"{name}-*"))
        if dirs and kill_when == "checkpoint-1" and (dirs[0] / "checkpoints" / "step-000001").is_dir():
            break
        if dirs and kill_when == "pool-3" and len(list((dirs[0] / "pool").rglob("_versions/*"))) >= 3:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    resumed = _spawn_train(overrides, name, env)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])
    assert final["steps"] == ref["steps"] == 2
    assert final["checkpoint_checksum"] == ref["checkpoint_checksum"]
    assert not ref["checkpoint_checksum"].startswith("base:")
    ref_rows = _pool_rows(Path(ref["run_dir"]), ref["run_key"])
    assert len(ref_rows) == 2 * 2 * 4
    assert _pool_rows(Path(final["run_dir"]), final["run_key"]) == ref_rows
