"""The LANPO training flow (and, with `rollout_mix: {plain: 1}`, the plain-GRPO baseline).

The loop of `lanpo_core.step.train`, with each stage a cached Prefect task (tasks/stages.py): per step, build
feedback contexts from the pool -> generate the group's rollouts (plain, reflection, abstraction) -> verify and
score -> write the pool -> GRPO update -> evaluate every `eval.every` steps and at the end. Re-running a finished
flow completes from the cache, and a flow killed at any stage resumes at the first unfinished one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# Defaults for every process that runs the flows (`lanpo train`, `lanpo serve`, tests), set before Prefect is
# imported because Prefect reads its settings once, at import. `setdefault`: the user's environment still decides.
for _key, _value in {
    # usage telemetry over the network: the ephemeral Prefect server's (whose heartbeat also printed a "database is
    # locked" traceback on a busy first start), the Prefect client's, vLLM's and Hugging Face's (DO_NOT_TRACK; vLLM
    # accepts only "1"), MLflow's
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A new PREFECT_HOME is migrated while the ephemeral server starts; on a busy 2-core machine that overran
    # Prefect's 20 s and failed the first run ("Timed out while attempting to connect to ephemeral Prefect API").
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)
# Library noise with nothing for a user to act on: TRL warns about the vLLM version at import, but lanpo runs vLLM
# itself, not through TRL; vLLM reports at every import that Triton has no CPU backend.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
# dill (via Prefect's input hashing) logs a disassembly of the functions it pickles at INFO into the task logs
logging.getLogger("dill").setLevel(logging.WARNING)

# imported after the defaults above
from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem

from lanpo_core.checkpoint import latest_checkpoint
from lanpo_core.config import RunConfig, build_config, load_config
from lanpo_core.runtime import PolicyRef, data_dir
from lanpo_core.step import eval_due, problems_for_step
from tasks import tracking
from tasks.provenance import Provenance, model_fingerprint, provenance
from tasks.resources import RunHandle, release
from tasks.stages import build_feedback, evaluate_policy, generate_rollouts, score, update_policy, write_pool

from .serve import served_mlflow_ui

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
STAGES = ("build-feedback", "generate-rollouts", "score-rollouts", "write-pool", "update-policy")


@dataclass(frozen=True)
class StageEvent:
    """A stage of an in-process run starting or finishing, with the latest numbers known (None: not yet)."""

    stage: str
    step: int
    """The training step the stage belongs to, from 1 (0: the base policy's evaluation before the first step)."""
    finished: bool
    reward: float | None
    """Mean reward of the latest step's rollouts."""
    accuracy: float | None
    """Latest held-out accuracy (`headline_accuracy`)."""


progress_hook: ContextVar[Callable[[StageEvent], None] | None] = ContextVar("lanpo_progress_hook", default=None)
"""Told about every stage of an in-process run (the CLI's progress bar). Not a flow parameter: those stay plain data,
which deployments render as a form."""


@contextmanager
def reporting(hook: Callable[[StageEvent], None]) -> Iterator[None]:
    """Tell `hook` about every stage of the runs started in this context."""
    token = progress_hook.set(hook)
    try:
        yield
    finally:
        progress_hook.reset(token)


def resolve_config_path(config: str) -> str:
    """Config paths are tried as given, then relative to the repository (deployments run from anywhere)."""
    path = Path(config)
    if not path.is_file() and (REPO / config).is_file():
        path = REPO / config
    return str(path.resolve()) if path.is_file() else config


def run_folder(cfg: RunConfig, run_name: str | None, inputs: Provenance) -> Path:
    """runs/<name>-<digest of config and inputs>: the same config, overrides, name, code, data and models give the
    same run (resumed, or completed from cache); a change to any of them starts a new one."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or cfg.name).strip("-") or "run"
    digest = hashlib.sha256(f"{cfg.digest()}|{inputs.digest()}".encode()).hexdigest()[:8]
    return (Path(cfg.paths.runs_dir) / f"{slug}-{digest}").resolve()


def open_run(cfg: RunConfig, run_name: str | None, inputs: Provenance) -> RunHandle:
    """The run's identity and folder."""
    run_dir = run_folder(cfg, run_name, inputs)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(_yaml(cfg))
    return RunHandle.for_run(cfg, run_dir)


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_hub_model(spec: str, revision: str | None = None, timeout: float = 10.0) -> None:
    """A hub model must be in the local cache or reachable: one metadata request, instead of the loaders' minutes of
    retries at the first stage. Raises ModelNotFoundError with one sentence."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    from lanpo_core.models import ModelNotFoundError, hub_error_hint

    if isinstance(try_to_load_from_cache(spec, "config.json", revision=revision), str):
        return
    if HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(hub_error_hint(spec, RuntimeError("not in the local cache")))
    try:
        HfApi().model_info(spec, revision=revision, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - unreachable, unknown, gated: all mean this run cannot load it
        raise ModelNotFoundError(hub_error_hint(spec, e)) from None


@dataclass(frozen=True)
class Inputs:
    problem_sets: list
    """The training set, then the held-out sets (`data.eval` order)."""
    provenance: Provenance
    """Digests of the code, the problem sets and the models (part of the run's identity)."""

    @property
    def train(self) -> list:
        """The training problems."""
        return self.problem_sets[0].problems

    def datasets(self) -> list:
        """(problem set, MLflow input context) pairs, for `tracking.log_datasets`."""
        return [(s, "evaluation" if i else "training") for i, s in enumerate(self.problem_sets)]


def check_inputs(cfg: RunConfig) -> Inputs:
    """Fail before the first stage on what would fail later: data files, model specs. Returns the problem sets and
    the run's provenance."""
    from lanpo_core.data import load_problems
    from lanpo_core.models import resolve_embedder, resolve_policy

    sets = [load_problems(spec, data_dir(cfg)) for spec in [cfg.data.train, *cfg.data.eval]]
    policy = resolve_policy(cfg.model.name_or_path, cfg.paths.cache_dir)  # prepares the bundled model on first use
    embedder = resolve_embedder(cfg.pool.embedding_model)
    for model, revision in ((policy, cfg.model.revision), (embedder, None)):
        if model.kind == "hub":
            check_hub_model(model.spec, revision)
    models = [model_fingerprint(policy.spec, policy.path, policy.kind, cfg.model.revision),
              model_fingerprint(embedder.spec, embedder.path, embedder.kind)]
    return Inputs(sets, provenance([(f"{i}:{s.name}", s.problems) for i, s in enumerate(sets)], models))


def result_storage(run: RunHandle) -> LocalFileSystem:
    """Task results persist under the run folder, in a storage block named after the run."""
    store = LocalFileSystem(basepath=str(Path(run.run_dir) / "prefect-results"))
    name = "lanpo-" + hashlib.sha256(run.run_dir.encode()).hexdigest()[:16]
    store.save(name, overwrite=True)
    return store


def prefect_tags() -> dict[str, str]:
    """MLflow tags that tie a run to the Prefect flow run logging into it: the flow run's id, name and (on a Prefect
    server) URL, the flow as the run's source, and a description (`mlflow.note.content`) that links back."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

    try:
        ctx = get_run_context()
    except MissingContextError:  # called outside a flow run
        return {}
    run, flow_name = ctx.flow_run, ctx.flow.name
    tags = {"prefect_flow_run_id": str(run.id), "prefect_flow_run_name": run.name,
            "mlflow.source.name": flow_name, "mlflow.source.type": "JOB"}
    if PREFECT_API_URL.value():  # a server; its UI's address is derived from the API's unless PREFECT_UI_URL says
        tags["prefect_flow_run_url"] = f"{PREFECT_UI_URL.value()}/runs/flow-run/{run.id}"
        where = f"[{run.name}]({tags['prefect_flow_run_url']})"
    else:  # the ephemeral API stops with the run; its database (under PREFECT_HOME) keeps the flow run
        where = (f"`{run.name}` on Prefect's ephemeral API, which has no UI (`prefect server start` with PREFECT_HOME="
                 f"{PREFECT_HOME.value()} shows it at /runs/flow-run/{run.id})")
    tags["mlflow.note.content"] = f"Logged by `{flow_name}` flow run {where}, id `{run.id}`."
    return tags


# No `log_prints`: lanpo logs rather than prints, and Prefect's print patch also took what libraries print into a
# captured sys.stdout (dill disassembling functions while datasets fingerprints a dataset) into the run's logs.
@flow(name="lanpo-train", persist_result=True)
def lanpo_train(config: str | RunConfig = DEFAULT_CONFIG, overrides: list[str] | None = None,
                run_name: str | None = None) -> dict[str, Any]:
    """Train a policy with LANPO (or plain GRPO when the config's rollout mix is plain only).

    config: path of a YAML run config (relative paths are also looked up in the repository), or a RunConfig.
    overrides: dotted KEY=VALUE overrides, e.g. ["grpo.learning_rate=1e-6", "grpo.steps=4"].
    run_name: name of the run (default: the config's `name`); the same name and config resume/reuse it.
    """
    logger = get_run_logger()
    cfg = _config(config, list(overrides or []))
    inputs = check_inputs(cfg)
    train_problems = inputs.train
    run = open_run(cfg, run_name, inputs.provenance)

    policy, pool_version, before, evals = PolicyRef.base(cfg), 0, {}, {}
    try:
        tags = {**prefect_tags(), **inputs.provenance.tags(), **tracking.override_tags(overrides or [])}
        with tracking.parent_run(cfg, run.key, run_name or cfg.name, tags=tags) as mlflow_run_id:
            tracking.log_datasets(mlflow_run_id, inputs.datasets())
            link = tracking.run_link(cfg, mlflow_run_id, served_mlflow_ui())
            logger.info("run %s in %s; MLflow run %s", run.key, run.run_dir, link)
            stage = _Stages(run, mlflow_run_id)
            if cfg.eval.at_start:  # the "before" of the run's accuracy; cached like every stage
                before = stage(evaluate_policy, policy)
            for step in range(cfg.grpo.steps):
                stage.step = step + 1
                problems = problems_for_step(train_problems, step, cfg.rollout.batch_problems, cfg.seed)
                feedback = stage(build_feedback, step, problems, policy, pool_version)
                completions = stage(generate_rollouts, step, problems, policy, feedback)
                rollouts = stage(score, step, problems, policy, completions)
                pool_version = stage(write_pool, step, problems, rollouts, feedback)
                policy = stage(update_policy, step, problems, policy, rollouts)
                if eval_due(step, cfg):
                    evals = stage(evaluate_policy, policy)
                logger.info("step %d/%d done: %s", step + 1, cfg.grpo.steps, stage.progress())
            summary = {"run_key": run.key, "run_dir": run.run_dir, "mlflow_run_id": mlflow_run_id,
                       "mlflow_tracking_uri": tracking.tracking_uri(cfg), "checkpoint": policy.path,
                       "checkpoint_checksum": policy.checksum, "steps": policy.step, "pool_version": pool_version,
                       "inputs_digest": inputs.provenance.digest(),
                       **_no_times(evals)}
            if before:
                summary["eval_before"] = _no_times(before)
            if mlflow_run_id:
                summary["mlflow_experiment_id"] = tracking.experiment_id(cfg)
                summary["stage_seconds"] = _stage_seconds(mlflow_run_id)
                tracking.log_json(mlflow_run_id, summary, "summary.json")
                tracking.log_json(mlflow_run_id, cfg.model_dump(mode="json"), "config.json")
                tracking.log_curves(mlflow_run_id)
            summary.update(link.summary())
            create_markdown_artifact(_summary_markdown(summary, link), key=_artifact_key(run.key),
                                     description=f"lanpo run {run.key}")
            return summary
    finally:
        release(run)  # waits for the last checkpoint write


def _config(config: str | RunConfig, overrides: list[str]) -> RunConfig:
    if isinstance(config, RunConfig):
        if not overrides:
            return config
        cfg = build_config(config.model_dump(mode="json"), overrides)
        cfg.source = config.source
        return cfg
    return load_config(resolve_config_path(config), overrides)


class _Stages:
    """The run's stage tasks, with results stored under the run folder; reports each stage to `progress_hook`."""

    def __init__(self, run: RunHandle, mlflow_run_id: str) -> None:
        store = result_storage(run)
        self.tasks = {t.name: t.with_options(result_storage=store) for t in
                      (build_feedback, generate_rollouts, score, write_pool, update_policy, evaluate_policy)}
        self.run, self.mlflow_run_id = run, mlflow_run_id
        self.step = 0
        self.reward: float | None = None
        self.accuracy: float | None = None

    def __call__(self, stage: Task, *args: Any) -> Any:
        name = stage.name
        hook = progress_hook.get()
        if hook:
            hook(StageEvent(name, self.step, False, self.reward, self.accuracy))
        task = self.tasks[name]
        if stage is update_policy and not self._checkpoint_on_disk(self.step):
            # With `grpo.checkpoint_background` the checkpoint is written after the task has returned (and its result
            # was cached): a run killed during that write has the update cached but not its checkpoint, so the update
            # runs again (from the previous checkpoint, to the same weights). Older checkpoints may be pruned, never
            # missing.
            task = task.with_options(refresh_cache=True)
        result = task(self.run, *args, self.mlflow_run_id)
        if stage is score:
            rewards = [r.reward for r in result if r.reward is not None]
            self.reward = sum(rewards) / len(rewards) if rewards else None
        elif stage is evaluate_policy:
            self.accuracy = headline_accuracy(result)
        if hook:
            hook(StageEvent(name, self.step, True, self.reward, self.accuracy))
        return result

    def progress(self) -> str:
        """The latest mean reward and held-out accuracy, for the flow's one log line per step."""
        parts = [f"{label} {value:.3f}" for label, value in (("reward", self.reward),
                                                            ("held-out accuracy", self.accuracy)) if value is not None]
        return ", ".join(parts) or "no reward yet"

    def _checkpoint_on_disk(self, step: int) -> bool:
        latest = latest_checkpoint(self.run.run_dir)
        return latest is not None and latest.step >= step


ACCURACY = re.compile(r"eval/(.+)/(greedy|mean_at_k|feedback_greedy)")
"""The accuracy metrics of a benchmark, as (benchmark, kind) (not its coverage, per-group or per-status counts)."""


def _no_times(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def headline_accuracy(metrics: dict[str, float]) -> float | None:
    """Zero-shot greedy pass@1 (mean@k when greedy is off), averaged over the benchmarks."""
    found = {k: ACCURACY.fullmatch(k) for k in metrics}
    for wanted in ("greedy", "mean_at_k"):
        values = [metrics[k] for k, m in found.items() if m and m.group(2) == wanted]
        if values:
            return sum(values) / len(values)
    return None


def _stage_seconds(mlflow_run_id: str) -> dict[str, float]:
    """Seconds by stage summed over the run, from the `time/*_seconds` metrics the stages log when they really run
    (the latest value per step: a stage repeated after a crash logs its step again)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    totals = {}
    for key in client.get_run(mlflow_run_id).data.metrics:
        if key.startswith("time/") and key.endswith("_seconds"):
            history = sorted(client.get_metric_history(mlflow_run_id, key), key=lambda m: m.timestamp)
            totals[key.removeprefix("time/").removesuffix("_seconds")] = sum({m.step: m.value for m in history}.values())
    return totals


def _artifact_key(run_key: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", run_key.lower()).strip("-")[:100] or "lanpo-run"


def _summary_markdown(summary: dict[str, Any], link: tracking.RunLink) -> str:
    def cell(v: Any) -> str:
        return ", ".join(f"{k} {x:.4g}" for k, x in v.items()) if isinstance(v, dict) else str(v)

    rows = "\n".join(f"| {k} | {cell(v)} |" for k, v in summary.items())
    return (f"# lanpo run `{summary['run_key']}`\n\nMLflow run: {link.markdown()}\n\n"
            f"| field | value |\n|---|---|\n{rows}\n")


def total_stages(cfg: RunConfig) -> int:
    return (cfg.grpo.steps * len(STAGES) + sum(eval_due(s, cfg) for s in range(cfg.grpo.steps))
            + cfg.eval.at_start)
