"""Evaluate any policy (a run's checkpoint, a local folder, the bundled model or a hub model) zero-shot on the
config's held-out benchmarks, as its own MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# first: flows.train sets the library defaults (telemetry off, ...) that Prefect reads when it is imported
from .train import DEFAULT_CONFIG, check_inputs, prefect_tags, resolve_config_path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from lanpo_core.config import load_config
from tasks import tracking

from .serve import served_mlflow_ui


@task(name="evaluate-model", retries=1)
def evaluate_model(config_path: str, overrides: list[str], model: str, out_dir: str) -> dict[str, float]:
    from lanpo_core.data import load_problems
    from lanpo_core.evaluate import evaluate_zero_shot
    from lanpo_core.models import resolve_policy
    from lanpo_core.rollout import make_engine
    from lanpo_core.runtime import data_dir
    from lanpo_core.verify import Verifier

    cfg = load_config(config_path, overrides)
    benchmarks = {s.name: s.problems for s in (load_problems(spec, data_dir(cfg)) for spec in cfg.data.eval)}
    path = resolve_policy(model, cfg.paths.cache_dir).path
    with make_engine(cfg, path) as engine, Verifier.from_config(cfg.verify) as verifier:
        metrics, predictions = evaluate_zero_shot(engine, benchmarks, cfg, verifier, seed=cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for p in predictions:
            handle.write(json.dumps(p.as_dict()) + "\n")
    return metrics


@flow(name="lanpo-evaluate")
def lanpo_evaluate(config: str = DEFAULT_CONFIG, model: str | None = None, overrides: list[str] | None = None,
                   run_name: str | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on the benchmarks of `config`.

    config: YAML run config (its `data.eval`, `eval`, `prompts`, `verify` and `rollout` sections are used).
    model: a checkpoint folder, a model folder, `smollm2-135m-instruct` or a hub name (default: the config's model).
    overrides: dotted KEY=VALUE overrides.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    config_path = resolve_config_path(config)
    cfg = load_config(config_path, overrides)
    inputs = check_inputs(cfg)
    model = model or cfg.model.name_or_path
    from lanpo_core.models import resolve_policy

    resolve_policy(model, cfg.paths.cache_dir)  # before any task: a missing model or damaged checkpoint fails here
    name = run_name or f"eval-{Path(model).name}"
    out_dir = Path(cfg.paths.runs_dir).resolve() / "evaluations" / f"{name}-{cfg.digest()[:8]}"
    # a run of its own per flow run (a retry of the flow run resumes it); ends FAILED or KILLED like a training run
    tags = {"lanpo_kind": "evaluation", "model": model, **prefect_tags(), **tracking.override_tags(overrides)}
    with tracking.parent_run(cfg, f"evaluation-{flow_run.id}", name, tags=tags) as run_id:
        tracking.log_datasets(run_id, inputs.datasets()[1:])  # the held-out sets; the training set is not read
        link = tracking.run_link(cfg, run_id, served_mlflow_ui())
        logger.info("evaluating %s; MLflow run %s", model, link)
        metrics = evaluate_model(config_path, overrides, model, str(out_dir))
        tracking.log_metrics(run_id, metrics, step=0)
        tracking.log_predictions(run_id, out_dir / "predictions.jsonl", step=0)
    create_table_artifact([{"metric": k, "value": round(v, 4)} for k, v in sorted(metrics.items())],
                          key="lanpo-evaluation", description=f"zero-shot evaluation of {model}; MLflow run: "
                                                              f"{link.markdown()}")
    logger.info("evaluated %s: %s", model, metrics)
    return {"model": model, "mlflow_run_id": run_id, **link.summary(), "predictions": str(out_dir / "predictions.jsonl"),
            **metrics}
