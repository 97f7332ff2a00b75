"""The stages of a LANPO training step as cached Prefect tasks: thin wrappers over `lanpo_core`.

Cache keys are content-based: task name and source, run key, config digest, step, the policy checksum, the pool
version, and a digest of the stage's data inputs (computed by Prefect's own hasher over plain data). Heavy objects
never enter a key: tasks fetch them from `tasks.resources`. The MLflow run id is passed for logging only and is
left out of the key, so a resumed run keeps its cache even in a new MLflow run.

Side effects are made safe to repeat: metrics are logged only when a stage really runs; the pool refuses rows it
already holds (uids are per run, step, problem and rollout), so a pool write repeated after a crash adds nothing;
an update repeated after a crash starts again from the previous checkpoint and writes the same checkpoint.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from lanpo_core.evaluate import evaluate_with_feedback, evaluate_zero_shot
from lanpo_core.feedback import FeedbackBatch, FeedbackBuilder
from lanpo_core.rollout import RolloutRequest, SamplingSpec
from lanpo_core.step import (Rollout, plain_prompt_ids, plan_requests, pool_records, problems_for_step,
                             rollout_metrics, score_rollouts, training_samples)

from . import tracking
from .resources import PolicyRef, RunHandle, resources

NOT_KEYED = ("mlflow_run_id",)


def stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    keyed = {k: v for k, v in parameters.items() if k not in NOT_KEYED}
    return hash_objects(context.task.name, keyed)


STAGE_CACHE = CachePolicy.from_cache_key_fn(stage_key) + TASK_SOURCE


def _log(mlflow_run_id: str | None, metrics: dict[str, Any], step: int) -> None:
    if mlflow_run_id:
        tracking.log_metrics(mlflow_run_id, metrics, step)


def _step_problems(run: RunHandle, step: int):
    res = resources(run)
    return problems_for_step(res.train_problems, step, res.cfg.rollout.batch_problems, res.cfg.seed)


def _abstractor(run: RunHandle, step: int):
    """Lessons come from the abstractor engine, greedily (deterministic, the model's best summary)."""
    res = resources(run)
    cfg = res.cfg
    if cfg.lanpo.abstraction.abstractor == "extractive":
        return None

    def write_lessons(conversations):
        sampling = SamplingSpec.from_config(cfg, seed=step, temperature=0.0,
                                            max_new_tokens=cfg.lanpo.abstraction.max_new_tokens)
        requests = [RolloutRequest(messages=m, n=1) for m in conversations]
        completions = res.abstractor_engine.generate(requests, sampling)
        write_lessons.tokens += sum(len(c.completion_ids) for c in completions)
        return [c.text for c in completions]
    write_lessons.tokens = 0  # generated lesson tokens: part of what LANPO costs over GRPO
    return write_lessons


@task(name="build-feedback", cache_policy=STAGE_CACHE, persist_result=True)
def build_feedback(run: RunHandle, step: int, policy: PolicyRef, pool_version: int,
                   mlflow_run_id: str | None = None) -> FeedbackBatch:
    """Reflection and abstraction contexts for the step's problems, audited by the leakage guard."""
    res = resources(run)
    cfg = res.cfg
    counts = cfg.lanpo.rollout_mix.counts(cfg.rollout.num_generations)
    kinds = [k for k in ("reflection", "abstraction") if counts[k]]
    if not kinds:
        return FeedbackBatch()
    if "abstraction" in kinds and cfg.lanpo.abstraction.abstractor == "policy":
        res.ensure_policy(policy)
    abstractor = _abstractor(run, step)
    builder = FeedbackBuilder(res.pool, cfg.lanpo, cfg.prompts, abstractor,
                              extraction=cfg.verify.extraction, seed=cfg.seed)
    problems = _step_problems(run, step)
    batch, extra = FeedbackBatch(), {}
    for kind in kinds:  # timed apart: abstraction pays for the abstractor's generation, reflection only for lookups
        started = time.perf_counter()
        batch.update(builder.build(problems, step, [kind], policy_version=policy.step))
        extra[f"time/{kind}_seconds"] = time.perf_counter() - started
    extra["feedback/abstractor_tokens"] = float(abstractor.tokens if abstractor else 0)
    _log(mlflow_run_id, {**batch.metrics(), **extra}, step)
    return batch


@task(name="generate-rollouts", cache_policy=STAGE_CACHE, persist_result=True)
def generate_rollouts(run: RunHandle, step: int, policy: PolicyRef, feedback: FeedbackBatch,
                      mlflow_run_id: str | None = None) -> list:
    """G rollouts per problem, split by the rollout mix (contexts fall back to plain when missing)."""
    res = resources(run)
    res.ensure_policy(policy)
    plan = plan_requests(_step_problems(run, step), feedback, res.cfg)
    started = time.perf_counter()
    completions = res.engine.generate(plan.requests, SamplingSpec.from_config(res.cfg, step=step))
    seconds = time.perf_counter() - started
    tokens = sum(len(c.completion_ids) for c in completions)
    _log(mlflow_run_id, {**plan.metrics(), "time/generate_seconds": seconds,
                         "rollout/tokens_per_second": tokens / max(seconds, 1e-9)}, step)
    return completions


@task(name="score-rollouts", cache_policy=STAGE_CACHE, persist_result=True)
def score(run: RunHandle, step: int, policy: PolicyRef, completions: list,
          mlflow_run_id: str | None = None) -> list[Rollout]:
    """Verify every completion against its gold answer."""
    res = resources(run)
    started = time.perf_counter()
    rollouts = score_rollouts(completions, _step_problems(run, step), res.verifier, policy.step)
    _log(mlflow_run_id, {**rollout_metrics(rollouts), "time/verify_seconds": time.perf_counter() - started}, step)
    return rollouts


@task(name="write-pool", cache_policy=STAGE_CACHE, persist_result=True, retries=2, retry_delay_seconds=2)
def write_pool(run: RunHandle, step: int, rollouts: list[Rollout], feedback: FeedbackBatch,
               mlflow_run_id: str | None = None) -> int:
    """Append the step's rollouts (and new lessons) to the pool as one version; returns the version."""
    res = resources(run)
    pool = res.pool
    problems = {p.id: p for p in _step_problems(run, step)}
    # Lessons made in build-feedback are staged in the pool object of the process that made them; a resumed
    # process got the feedback from the cache, so stage them again (the pool ignores lesson sets it holds).
    for context in feedback.contexts.values():
        if context.kind == "abstraction" and context.lessons and pool.get_lessons(context.source_ids) is None:
            p = problems[context.problem_id]
            pool.put_lessons(context.source_ids, context.lessons, step=step, problem_id=p.id, problem_text=p.question)
    started = time.perf_counter()
    report = pool.write_step(step, pool_records(rollouts, list(problems.values())))
    _log(mlflow_run_id, {**report.as_metrics(), "pool/rows": pool.count(),
                         "time/pool_seconds": time.perf_counter() - started}, step)
    if mlflow_run_id and res.cfg.tracking.log_rollout_samples:
        sample = [{**r.as_dict(), "prompt_ids": None, "completion_ids": None, "logprobs": None,
                   "context": (feedback.get(r.problem_id, r.kind).context_text
                               if feedback.get(r.problem_id, r.kind) else None)}
                  for r in rollouts[: res.cfg.tracking.log_rollout_samples]]
        tracking.log_json(mlflow_run_id, sample, f"rollouts/step-{step:05d}.json")
        lessons = [{"problem_id": c.problem_id, "sources": list(c.source_ids), "lessons": list(c.lessons)}
                   for c in feedback.contexts.values() if c.kind == "abstraction"]
        if lessons:
            tracking.log_json(mlflow_run_id, lessons, f"lessons/step-{step:05d}.json")
    return report.version


@task(name="update-policy", cache_policy=STAGE_CACHE, persist_result=True)
def update_policy(run: RunHandle, step: int, policy: PolicyRef, rollouts: list[Rollout],
                  mlflow_run_id: str | None = None) -> PolicyRef:
    """One GRPO update on the step's rollouts; writes a checkpoint and syncs the rollout engine."""
    res = resources(run)
    res.ensure_policy(policy)
    updater = res.updater
    samples, unusable = training_samples(rollouts, plain_prompt_ids(_step_problems(run, step), res.tokenizer,
                                                                    res.cfg), res.cfg)
    started = time.perf_counter()
    metrics = updater.step(samples)
    seconds = time.perf_counter() - started
    info = updater.save_checkpoint()
    new = PolicyRef(info.step, info.checksum, str(info.path))
    if "engine" in res._objects:
        res.engine.sync_from(updater.model)
    res.policy = new
    _log(mlflow_run_id, {**{f"update/{k}": v for k, v in metrics.items()}, "update/unusable_groups": unusable,
                         "time/update_seconds": seconds,
                         "time/sync_seconds": time.perf_counter() - started - seconds}, step)
    return new


@task(name="evaluate-policy", cache_policy=STAGE_CACHE, persist_result=True, retries=1)
def evaluate_policy(run: RunHandle, policy: PolicyRef, mlflow_run_id: str | None = None) -> dict[str, float]:
    """Zero-shot accuracy of `policy` on the held-out benchmarks; predictions saved under the run folder."""
    res = resources(run)
    res.ensure_policy(policy)
    cfg = res.cfg
    started = time.perf_counter()
    metrics, predictions = evaluate_zero_shot(res.engine, res.eval_problems, cfg, res.verifier, seed=cfg.seed)
    metrics["time/eval_seconds"] = time.perf_counter() - started
    if cfg.eval.feedback:
        started = time.perf_counter()
        builder = FeedbackBuilder(res.pool, cfg.lanpo, cfg.prompts, _abstractor(run, policy.step),
                                  extraction=cfg.verify.extraction, seed=cfg.seed, store_lessons=False)
        more, feedback_predictions = evaluate_with_feedback(res.engine, res.eval_problems, cfg, res.verifier,
                                                            builder, seed=cfg.seed)
        metrics.update(more)
        predictions += feedback_predictions
        metrics["time/eval_feedback_seconds"] = time.perf_counter() - started
    path = res.handle.run_dir + f"/eval/step-{policy.step:05d}.jsonl"
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for p in predictions:
            handle.write(json.dumps(p.as_dict()) + "\n")
    _log(mlflow_run_id, metrics, policy.step)
    if mlflow_run_id:
        tracking.log_file(mlflow_run_id, path, "eval")
    return metrics
