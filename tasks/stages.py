"""The stages of a LANPO training step as cached Prefect tasks: thin wrappers over `lanpo_core.step`.

Each task looks up the run's runtime, calls the core stage and logs its metrics. Cache keys are Prefect's own: the
task's source plus its inputs (run handle with the whole config, step, the step's problems, the policy checksum,
the pool version, the stage's data inputs), leaving out the MLflow run id, which is passed for logging only, so a
resumed run keeps its cache even in a new MLflow run. Heavy objects never enter a key.

The stages take the step counted from 0 (as `lanpo_core.step` does); MLflow steps and task run names count it from
1 (`update-policy-step1` is the first update; tasks/tracking.py, "Step convention"), which is also the number of the
policy the step's update makes and its evaluation evaluates.

Results are stored as JSON (tasks/serializer.py), so loading one cannot run code. Side effects are made safe to
repeat: metrics are logged only when a stage really runs; the completions and predictions tables take a step once;
the pool refuses rows it already holds (uids are per run, step, problem and rollout), so a pool write repeated after
a crash adds nothing; an update repeated after a crash starts again from the previous checkpoint and writes the same
checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from lanpo_core import step as core
from lanpo_core.feedback import FeedbackBatch
from lanpo_core.runtime import PolicyRef
from lanpo_core.step import Rollout

from . import tracking
from .resources import RunHandle, runtime
from .serializer import StageResultSerializer

STAGE_CACHE = (INPUTS - "mlflow_run_id") + TASK_SOURCE
RESULTS = StageResultSerializer()  # JSON, never pickles: a result file cannot run code when a resumed run loads it
STAGE: dict[str, Any] = dict(cache_policy=STAGE_CACHE, persist_result=True, result_serializer=RESULTS)
"""Options of every stage task."""


def _run_name(stage: str) -> Callable[..., str]:
    """Task runs of a training stage are named by the stage and the step counted from 1 (`update-policy-step3`)."""
    def name(parameters: dict[str, Any]) -> str:
        return f"{stage}-step{parameters['step'] + 1}"
    return name


def _log(mlflow_run_id: str | None, metrics: dict[str, Any], step: int) -> None:
    """Log a training stage's metrics at the MLflow step of training step `step` (from 0): `step + 1`."""
    if mlflow_run_id:
        tracking.log_metrics(mlflow_run_id, metrics, step + 1)


@task(name="build-feedback", task_run_name=_run_name("build-feedback"), **STAGE)
def build_feedback(run: RunHandle, step: int, problems: list, policy: PolicyRef, pool_version: int,
                   mlflow_run_id: str | None = None) -> FeedbackBatch:
    """Reflection and abstraction contexts for the step's problems, audited by the leakage guard."""
    feedback, metrics = core.build_feedback(runtime(run), problems, step, policy)
    _log(mlflow_run_id, metrics, step)
    return feedback


@task(name="generate-rollouts", task_run_name=_run_name("generate-rollouts"), **STAGE)
def generate_rollouts(run: RunHandle, step: int, problems: list, policy: PolicyRef, feedback: FeedbackBatch,
                      mlflow_run_id: str | None = None) -> list:
    """G rollouts per problem, split by the rollout mix (contexts fall back to plain when missing)."""
    completions, metrics = core.generate(runtime(run), problems, feedback, step, policy)
    _log(mlflow_run_id, metrics, step)
    return completions


@task(name="score-rollouts", task_run_name=_run_name("score-rollouts"), **STAGE)
def score(run: RunHandle, step: int, problems: list, policy: PolicyRef, completions: list,
          mlflow_run_id: str | None = None) -> list[Rollout]:
    """Verify every completion against its gold answer."""
    rollouts, metrics = core.score(runtime(run), problems, completions, policy)
    _log(mlflow_run_id, metrics, step)
    return rollouts


@task(name="write-pool", task_run_name=_run_name("write-pool"), retries=2, retry_delay_seconds=2, **STAGE)
def write_pool(run: RunHandle, step: int, problems: list, rollouts: list[Rollout], feedback: FeedbackBatch,
               mlflow_run_id: str | None = None) -> int:
    """Append the step's rollouts (and new lessons) to the pool as one version; returns the version. Logs the
    step's rollouts (`tracking.log_rollout_samples` of them) as completions and its lessons."""
    rt = runtime(run)
    version, metrics = core.write_pool(rt, problems, rollouts, feedback, step)
    _log(mlflow_run_id, metrics, step)
    keep = rt.cfg.tracking.log_rollout_samples
    if mlflow_run_id and keep:
        tracking.log_completions(mlflow_run_id, tracking.completion_rows(problems, rollouts, feedback, keep),
                                 step + 1)
        lessons = [{"problem_id": c.problem_id, "sources": list(c.source_ids), "lessons": list(c.lessons)}
                   for c in feedback.contexts.values() if c.kind == "abstraction"]
        if lessons:
            tracking.log_json(mlflow_run_id, lessons, f"lessons/step-{step + 1:05d}.json")
    return version


@task(name="update-policy", task_run_name=_run_name("update-policy"), **STAGE)
def update_policy(run: RunHandle, step: int, problems: list, policy: PolicyRef, rollouts: list[Rollout],
                  mlflow_run_id: str | None = None) -> PolicyRef:
    """One GRPO update on the step's rollouts; writes its checkpoint and syncs the rollout engine."""
    new, metrics = core.update(runtime(run), problems, rollouts, policy)
    _log(mlflow_run_id, metrics, step)
    get_run_logger().info("step %d update: loss %.4g, grad norm %.3g; per kind: %s", step + 1,
                          metrics.get("update/loss", 0.0), metrics.get("update/grad_norm", 0.0),
                          core.kind_summary(metrics) or "-")
    return new


@task(name="evaluate-policy", task_run_name="evaluate-policy-after{policy.step}", retries=1, **STAGE)
def evaluate_policy(run: RunHandle, policy: PolicyRef, mlflow_run_id: str | None = None) -> dict[str, float]:
    """Zero-shot accuracy of `policy` on the held-out benchmarks; predictions saved under the run folder."""
    metrics, _ = core.evaluate(runtime(run), policy)
    if mlflow_run_id:  # at the MLflow step of the training step that made `policy` (0: the base policy)
        tracking.log_metrics(mlflow_run_id, metrics, policy.step)
        tracking.log_predictions(mlflow_run_id, core.predictions_path(run.run_dir, policy.step), policy.step)
    return metrics
