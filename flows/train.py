"""The LANPO training flow (and, with `rollout_mix: {plain: 1}`, the plain-GRPO baseline).

Per step, in the order of METHOD.md: build feedback contexts from the pool -> generate the group's rollouts
(plain, reflection, abstraction) -> verify and score -> write the pool -> GRPO update -> evaluate every
`eval.every` steps and at the end. Each stage is a cached Prefect task (tasks/stages.py), so re-running a
finished flow completes from the cache, and a flow killed at any stage resumes at the first unfinished one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.filesystems import LocalFileSystem

from lanpo_core.config import RunConfig, load_config
from tasks import tracking
from tasks.resources import PolicyRef, RunHandle, release, resources
from tasks.stages import build_feedback, evaluate_policy, generate_rollouts, score, update_policy, write_pool

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
STAGES = ("build-feedback", "generate-rollouts", "score-rollouts", "write-pool", "update-policy")
progress: Any = None
"""A tqdm bar the CLI sets while it runs the flow in-process (a flow parameter must be plain data)."""


def resolve_config_path(config: str) -> str:
    """Config paths are tried as given, then relative to the repository (deployments run from anywhere)."""
    path = Path(config)
    if not path.is_file() and (REPO / config).is_file():
        path = REPO / config
    return str(path.resolve()) if path.is_file() else config


def open_run(cfg: RunConfig, config_path: str | None, overrides: list[str], run_name: str | None) -> RunHandle:
    """The run's identity and folder. Same config + overrides + name = same run (resumed, or completed from cache)."""
    name = run_name or cfg.name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    key = f"{slug}-{cfg.digest()[:8]}"
    run_dir = (Path(cfg.paths.runs_dir) / key).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(_yaml(cfg))
    return RunHandle(key, str(run_dir), config_path, tuple(overrides), cfg.digest())


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_inputs(cfg: RunConfig) -> None:
    """Fail before the first stage on what would fail later: data files, model specs."""
    from lanpo_core.data import load_problems
    from lanpo_core.models import resolve_embedder, resolve_policy

    base = Path(cfg.source).parent if cfg.source else None
    for spec in [cfg.data.train, *cfg.data.eval]:
        load_problems(spec, base)
    resolve_policy(cfg.model.name_or_path, cfg.paths.cache_dir)  # prepares the bundled model on first use
    resolve_embedder(cfg.pool.embedding_model)


def result_storage(run: RunHandle) -> LocalFileSystem:
    """Task results persist under the run folder, in a storage block named after the run."""
    store = LocalFileSystem(basepath=str(Path(run.run_dir) / "prefect-results"))
    name = "lanpo-" + hashlib.sha256(run.run_dir.encode()).hexdigest()[:16]
    store.save(name, overwrite=True)
    return store


def _prefect_tags() -> dict[str, str]:
    try:
        ctx = get_run_context()
        run = ctx.flow_run
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
        tags = {"prefect_flow_run_id": str(run.id), "prefect_flow_run_name": run.name}
        if ui:
            tags["prefect_flow_run_url"] = f"{ui}/runs/flow-run/{run.id}"
        return tags
    except Exception:
        return {}


def eval_due(step: int, cfg: RunConfig) -> bool:
    last = step == cfg.grpo.steps - 1
    return last or (cfg.eval.every > 0 and (step + 1) % cfg.eval.every == 0)


@flow(name="lanpo-train", persist_result=True, log_prints=True)
def lanpo_train(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None,
                run_name: str | None = None) -> dict[str, Any]:
    """Train a policy with LANPO (or plain GRPO when the config's rollout mix is plain only).

    config: path of a YAML run config (relative paths are also looked up in the repository).
    overrides: dotted KEY=VALUE overrides, e.g. ["grpo.learning_rate=1e-6", "grpo.steps=4"].
    run_name: name of the run (default: the config's `name`); the same name, config and overrides resume/reuse it.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    config_path = resolve_config_path(config)
    cfg = load_config(config_path, overrides)
    check_inputs(cfg)
    run = open_run(cfg, config_path, overrides, run_name)
    store = result_storage(run)
    stage = {t.name: t.with_options(result_storage=store) for t in
             (build_feedback, generate_rollouts, score, write_pool, update_policy, evaluate_policy)}
    logger.info("run %s in %s", run.key, run.run_dir)

    policy, pool_version, evals = PolicyRef.base(cfg), 0, {}
    try:
        with tracking.parent_run(cfg, run.key, run_name or cfg.name, tags=_prefect_tags()) as mlflow_run_id:
            for step in range(cfg.grpo.steps):
                feedback = _stage(stage["build-feedback"], run, step, policy, pool_version, mlflow_run_id)
                completions = _stage(stage["generate-rollouts"], run, step, policy, feedback, mlflow_run_id)
                rollouts = _stage(stage["score-rollouts"], run, step, policy, completions, mlflow_run_id)
                pool_version = _stage(stage["write-pool"], run, step, rollouts, feedback, mlflow_run_id)
                policy = _stage(stage["update-policy"], run, step, policy, rollouts, mlflow_run_id)
                if eval_due(step, cfg):
                    evals = _stage(stage["evaluate-policy"], run, policy, mlflow_run_id)
            summary = {"run_key": run.key, "run_dir": run.run_dir, "mlflow_run_id": mlflow_run_id,
                       "mlflow_tracking_uri": tracking.tracking_uri(cfg), "checkpoint": policy.path,
                       "checkpoint_checksum": policy.checksum, "steps": policy.step, "pool_version": pool_version,
                       **{k: v for k, v in evals.items() if not k.startswith("time/")}}
            if mlflow_run_id:
                tracking.log_json(mlflow_run_id, summary, "summary.json")
                tracking.log_json(mlflow_run_id, cfg.model_dump(mode="json"), "config.json")
                tracking.log_curves(mlflow_run_id)
                summary["mlflow_run_url"] = tracking.run_url(cfg, mlflow_run_id)
            create_markdown_artifact(_summary_markdown(summary), key=_artifact_key(run.key),
                                     description=f"lanpo run {run.key}")
            return summary
    finally:
        release(run)


def _stage(task: Any, *args: Any) -> Any:
    if progress is not None:
        progress.set_postfix_str(task.name)
    result = task(*args)
    if progress is not None:
        progress.update(1)
    return result


def _artifact_key(run_key: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", run_key.lower()).strip("-")[:100] or "lanpo-run"


def _summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    return f"# lanpo run `{summary['run_key']}`\n\n| field | value |\n|---|---|\n{rows}\n"


def total_stages(cfg: RunConfig) -> int:
    return cfg.grpo.steps * len(STAGES) + sum(eval_due(s, cfg) for s in range(cfg.grpo.steps))
