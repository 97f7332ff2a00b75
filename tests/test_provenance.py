"""A run's identity covers its code, its data and its models: an edit between two runs of the same command re-runs
the stages instead of returning the old results from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.provenance import Provenance, code_digest, data_digest, model_fingerprint, source_files

REPO = Path(__file__).resolve().parents[1]


def test_code_digest_covers_the_modules_the_stages_call_and_follows_an_edit(tmp_path, monkeypatch):
    covered = {relative for relative, _ in source_files()}
    for module in ("lanpo_core/verify.py", "lanpo_core/feedback.py", "lanpo_core/update.py", "lanpo_core/loss.py",
                   "tasks/stages.py", "flows/train.py"):
        assert module in covered, module
    package = tmp_path / "pkg_under_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rule.py").write_text("STRIP = '.,'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_digest(["pkg_under_test"])
    assert code_digest(["pkg_under_test"]) == before  # stable
    (package / "rule.py").write_text("STRIP = '.,;'\n")  # a verifier-like rule edited
    assert code_digest(["pkg_under_test"]) != before
    with pytest.raises(ModuleNotFoundError, match="no_such_package"):
        code_digest(["no_such_package"])


def test_data_digest_sees_a_corrected_gold_answer():
    from lanpo_core.data import Problem

    problems = [Problem("a1", "What is 2 + 2?", "4", "t"), Problem("b2", "What is 3 + 3?", "6", "t")]
    corrected = [problems[0], Problem("b2", "What is 3 + 3?", "7", "t")]  # same id: ids hash the question only
    assert data_digest([("train", problems)]) != data_digest([("train", corrected)])
    assert data_digest([("train", problems)]) == data_digest([("train", list(problems))])


def test_model_fingerprint_by_revision_files_or_hub_snapshot(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = model_fingerprint("my-model", str(folder), "local")
    assert model_fingerprint("my-model", str(folder), "local") == first
    (folder / "model.safetensors").write_bytes(b"x" * 10)  # a re-downloaded or re-saved model
    assert model_fingerprint("my-model", str(folder), "local") != first
    assert model_fingerprint("org/name", "org/name", "hub", revision="abc123") == "org/name@abc123"
    assert model_fingerprint("org/not-cached", "org/not-cached", "hub") == "org/not-cached@unresolved"


def _gsm8k_file(path: Path, answers: list[int]) -> None:
    rows = [{"question": f"Tom has {a - 1} apples and buys 1 more. How many apples does he have?",
             "answer": f"{a - 1} + 1 = {a}\n#### {a}"} for a in (5, 6, 7, 8)]
    for row, gold in zip(rows, answers):
        row["answer"] = row["answer"].rsplit("#### ", 1)[0] + f"#### {gold}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_a_corrected_gold_answer_reruns_the_stages(tmp_path, tiny_model_path, monkeypatch):
    """The same command before and after a gold answer is corrected in the data file: the second run is a new run
    (new folder, new MLflow run with another data digest) whose stages all execute, and the first is untouched."""
    from mlflow import MlflowClient

    from flows.train import lanpo_train
    from test_flows import task_states, tiny_overrides  # tests/ is on sys.path (rootdir conftest)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / "train.jsonl"
    _gsm8k_file(data, [5, 6, 7, 8])
    overrides = tiny_overrides(tiny_model_path, tmp_path / "runs", steps=1) + [
        "data.train.format=gsm8k", f"data.train.path={data}", "rollout.batch_problems=4"]
    first = lanpo_train("configs/tiny-cpu.yaml", overrides, "gold", return_state=True)
    assert first.is_completed(), first.message
    again = lanpo_train("configs/tiny-cpu.yaml", overrides, "gold", return_state=True)
    assert {s for _, s in task_states(again.state_details.flow_run_id)} == {"Cached"}  # nothing changed yet

    _gsm8k_file(data, [5, 6, 7, 9])  # one gold answer corrected
    fixed = lanpo_train("configs/tiny-cpu.yaml", overrides, "gold", return_state=True)
    assert fixed.is_completed(), fixed.message
    a, b = first.result(), fixed.result()
    assert a["run_key"] != b["run_key"]
    assert a["inputs_digest"] != b["inputs_digest"]
    states = task_states(fixed.state_details.flow_run_id)
    assert {s for _, s in states} == {"Completed"}, states
    assert {name for name, _ in states} >= {"generate-rollouts", "score-rollouts", "update-policy"}
    client = MlflowClient()
    tags_a = client.get_run(a["mlflow_run_id"]).data.tags
    tags_b = client.get_run(b["mlflow_run_id"]).data.tags
    assert tags_a["data_digest"] != tags_b["data_digest"]
    assert tags_a["code_digest"] == tags_b["code_digest"] == code_digest()[:16]
    assert Path(a["checkpoint"]).is_dir()  # the first run is left as it was


def test_provenance_tags_and_digest():
    p = Provenance(code="c" * 64, data="d" * 64, models="m" * 64)
    tags = p.tags()
    assert tags == {"code_digest": "c" * 16, "data_digest": "d" * 16, "models_digest": "m" * 16,
                    "inputs_digest": p.digest()}
    assert Provenance(code="c" * 64, data="e" * 64, models="m" * 64).digest() != p.digest()
