"""MLflow tracking for lanpo runs: one parent run per flow run, MLflow-safe metric names, offline default store.

A parent run (training or evaluation) ends FINISHED, FAILED (an error) or KILLED (Ctrl-C, SIGTERM); a run whose
process died without ending it (SIGKILL) is ended KILLED, with the lost attempt recorded in its tags, when the next
parent run of its experiment on the same host starts (at the latest when the run is resumed).

Default store: a SQLite file under `mlruns/` (in the current directory), with artifacts beside it in
`mlruns/artifacts`, so tracking works with no server; `tracking.mlflow_tracking_uri` or the env variable
MLFLOW_TRACKING_URI point it anywhere else (an `mlflow server`, Databricks, ...).

A run records its problem sets as dataset inputs (content digests) and, unless `tracking.system_metrics` is off,
MLflow's system metrics. `run_link` is the run's page in the MLflow UI (or the command that starts a UI on it).

What is logged compares across runs in MLflow's compare view: the realised config as one param per field
(`log_params` of `RunConfig.flat`: lists of sections indexed, `data.eval.0.name`; lists of values as JSON), the
overrides as one tag per key (`override_tags`), metric names that do not depend on settings (mean@k is
`eval/<bench>/mean_at_k`, k is the param `eval.samples`).

Step convention: MLflow step t is training step t, counted from 1. It holds the metrics of that step's stages (the
rollouts of the policy after t-1 updates, the update that makes policy t) and the evaluation of policy t; step 0 is
the base policy's evaluation (`eval.at_start`). Rollouts and evaluation predictions are tables (`log_table`, with a
`step` column: question, gold answer, context, response) and per-step YAML files that keep their real newlines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from lanpo_core import hardware
from lanpo_core.config import RunConfig

if TYPE_CHECKING:
    from lanpo_core.data import ProblemSet
    from lanpo_core.feedback import FeedbackBatch
    from lanpo_core.step import Rollout

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# no progress bar on the console (or in Prefect's logs) for each table read back before a step's rows are appended
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def safe_name(name: str) -> str:
    """MLflow keys allow letters, digits, `_ - . / ` and spaces; everything else becomes `_`."""
    return _UNSAFE.sub("_", name)[:250]


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.mlflow_tracking_uri:
        return cfg.tracking.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path("mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """For the local SQLite store, keep artifacts next to the database (MLflow's default is ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment kind MLflow 3's UI reads to open an experiment on its runs instead of its GenAI pages (traces),
where lanpo logs nothing. The 3.17 UI goes by the view chosen in its sidebar instead, or the URL's (`run_link`)."""


def experiment_id(cfg: RunConfig) -> str:
    """The id of the run's experiment, created on first use; it is tagged a model-training experiment (an existing
    one only when it has no kind yet: a kind set in the UI stays)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    key, kind = EXPERIMENT_KIND
    found = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if found is None:
        return mlflow.create_experiment(cfg.tracking.experiment, tags={key: kind},
                                        artifact_location=_artifact_location(tracking_uri(cfg)))
    if key not in found.tags:
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, kind)
    return found.experiment_id


def find_run(cfg: RunConfig, run_key: str) -> str | None:
    """The MLflow run id of an earlier attempt of the same lanpo run (resumed flows log into the same run)."""
    import mlflow

    runs = mlflow.search_runs([experiment_id(cfg)], filter_string=f"tags.lanpo_run_key = '{run_key}'",
                              output_format="list", max_results=1)
    return runs[0].info.run_id if runs else None


_ACTIVE: dict[str, str] = {}
"""Parent runs open in this process (run id -> tracking URI), for `end_active_runs`."""


def _attempt_tags() -> dict[str, str]:
    """Which process runs the attempt: a later attempt tells from these whether the run is still RUNNING because
    its process died."""
    import psutil

    return {"lanpo_pid": str(os.getpid()), "lanpo_host": socket.gethostname(),
            "lanpo_pid_started": f"{psutil.Process().create_time():.3f}"}


def _attempt_alive(tags: Mapping[str, str]) -> bool | None:
    """Is the process that runs an attempt still alive? None: it cannot be told (another host, no tags)."""
    import psutil

    if tags.get("lanpo_host") != socket.gethostname() or "lanpo_pid" not in tags:
        return None
    try:
        started = psutil.Process(int(tags["lanpo_pid"])).create_time()
    except (psutil.Error, ValueError):
        return False
    return abs(started - float(tags.get("lanpo_pid_started", "nan"))) < 0.01


def _end_dead_attempt(run_id: str, resuming: bool = True) -> None:
    """A run left RUNNING by a process that died without ending it (SIGKILL, OOM killer, power loss) is ended KILLED
    and the lost attempt recorded, before a new attempt (`resuming`) sets it RUNNING again."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return
    alive = _attempt_alive(run.data.tags)
    if alive is None:
        return
    if alive:
        if resuming:
            log.warning("MLflow run %s is RUNNING in live process %s: two attempts of the same run are logging into "
                        "it", run_id, run.data.tags["lanpo_pid"])
        return
    lost = int(run.data.tags.get("lanpo_lost_attempts", "0")) + 1
    client.set_tag(run_id, "lanpo_lost_attempts", str(lost))
    client.set_tag(run_id, "lanpo_last_lost_attempt",
                   f"pid {run.data.tags['lanpo_pid']} on {run.data.tags['lanpo_host']} died without ending the run")
    client.set_terminated(run_id, "KILLED")
    log.warning("MLflow run %s was left RUNNING by process %s, which died: ended it KILLED before resuming", run_id,
                run.data.tags["lanpo_pid"])


def end_status(exc: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED (a signal: Ctrl-C, SIGTERM) or FAILED (an error)."""
    from prefect.exceptions import TerminationSignal

    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, TerminationSignal)) else "FAILED"


def end_active_runs(status: str) -> None:
    """End the parent runs this process has open (a forced exit, which runs no `finally`)."""
    from mlflow import MlflowClient

    for run_id, uri in list(_ACTIVE.items()):
        try:
            MlflowClient(uri).set_terminated(run_id, status)
        except Exception as e:  # the store may be what the process hangs on; exit anyway
            log.warning("could not end MLflow run %s as %s: %s", run_id, status, e)
        _ACTIVE.pop(run_id, None)


@contextmanager
def parent_run(cfg: RunConfig, run_key: str, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start (or resume: the same `run_key`) the parent MLflow run of a lanpo run or evaluation; yields its id. The
    run ends FINISHED, FAILED (an error) or KILLED (a signal). Runs of the experiment that a dead process left
    RUNNING (an earlier attempt of this one, or any other on this host) are first ended KILLED."""
    import mlflow

    exp = experiment_id(cfg)
    existing = find_run(cfg, run_key)
    # every run of the experiment that a dead process left RUNNING, not only this one: evaluations are not resumed
    for running in mlflow.search_runs([exp], filter_string="attributes.status = 'RUNNING'", output_format="list"):
        _end_dead_attempt(running.info.run_id, resuming=running.info.run_id == existing)
    # What the `auto` precision settings resolved to on this machine: params of the run as first started, and tags
    # that say what the latest (possibly resumed, possibly on another CPU) attempt used.
    precision = hardware.describe(cfg)
    log.info("precision: update bf16 %s, vLLM %s, transformers %s (%s)", precision["precision/update_bf16"],
             precision["precision/vllm_dtype"], precision["precision/transformers_dtype"],
             precision["precision/reason"])
    run = mlflow.start_run(run_id=existing, experiment_id=None if existing else exp,
                           run_name=None if existing else run_name, log_system_metrics=cfg.tracking.system_metrics)
    run_id = run.info.run_id
    _ACTIVE[run_id] = tracking_uri(cfg)
    error: BaseException | None = None
    try:
        if existing is None:
            log_params(run_id, {**cfg.flat(), **precision})
        all_tags = {"lanpo_run_key": run_key, "config_digest": cfg.digest(), "config_source": cfg.source or "",
                    **_attempt_tags()}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        all_tags.update(tags or {})
        all_tags.update({safe_name(k): v[:5000] for k, v in precision.items()})
        mlflow.set_tags(all_tags)
        yield run_id
    except BaseException as e:
        error = e
        raise
    finally:
        if _ACTIVE.pop(run_id, None) is not None:  # not already ended by a forced exit
            mlflow.end_run(end_status(error))


def _param_value(value: Any) -> str:
    """A param's text: lists and mappings as JSON (diffs cleanly in the compare view), None as ""."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log params with MLflow-safe names, in batches of 100 (MLflow's cap per batch); the realised config is
    `RunConfig.flat()`, one param per field."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    items = [Param(safe_name(k), _param_value(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        MlflowClient().log_batch(run_id, params=items[i:i + 100])


def override_tags(overrides: Sequence[str]) -> dict[str, str]:
    """The command line's overrides: all of them in `overrides`, and one tag per key (`override.grpo.steps`: `20`),
    so that the compare view lines up what each run overrode."""
    tags = {"overrides": " ".join(overrides)[:5000]}
    for text in overrides:
        key, _, value = text.partition("=")
        tags[safe_name(f"override.{key.strip()}")] = value.strip()[:5000]
    return tags


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log finite numeric metrics with MLflow-safe names (NaN/inf and non-numbers are skipped)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(safe_name(k), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def log_json(run_id: str, obj: Any, artifact_file: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_dict(run_id, obj, artifact_file)


def log_file(run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), artifact_dir)


def _readable_yaml(rows: Any) -> str:
    """YAML with multi-line strings as literal blocks: contexts and responses read with their real newlines (PyYAML
    quotes the few strings a block cannot hold, e.g. with trailing spaces)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(rows, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)


def _read_table(run_id: str, artifact_file: str) -> dict[str, list] | None:
    """A run's table as logged (`{"columns": [...], "data": [[...], ...]}`), None when it has none yet."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, posixpath.dirname(artifact_file) or None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, artifact_file, tmp)).read_text())


def log_table(run_id: str, rows: Sequence[Mapping[str, Any]], artifact_file: str, step: int) -> None:
    """Append `rows` with a `step` column to the run's table `artifact_file`, which the MLflow UI shows as a table.
    One file for the whole run: one per step would grow the run's list of tables (`mlflow.loggedArtifacts`, a tag
    of at most 8000 characters) past its limit in a long run. A step the table already holds is not appended again
    (a stage repeated after a crash)."""
    import pandas as pd
    from mlflow import MlflowClient

    table = _read_table(run_id, artifact_file)
    if not rows or (table is not None and step in {row[table["columns"].index("step")] for row in table["data"]}):
        return
    new = pd.DataFrame([{"step": step, **row} for row in rows])
    client = MlflowClient()
    if table is None:
        client.log_table(run_id, new, artifact_file)  # also lists it among the run's tables, which the UI shows so
    else:  # appended here: MLflow's own append reads the file back with pandas' type guessing (gold "7" -> 7)
        old = pd.DataFrame(table["data"], columns=table["columns"], dtype=object)
        client.log_text(run_id, pd.concat([old, new], ignore_index=True).to_json(orient="split", index=False),
                        artifact_file)


def completion_rows(problems: Sequence[Any], rollouts: Sequence[Rollout], feedback: FeedbackBatch,
                    limit: int) -> list[dict[str, Any]]:
    """One readable row per rollout (the first `limit`): its problem's question and gold answer, the kind, the
    feedback context it was sampled with (the prompt minus the problem and instruction; None for plain), the
    response, the extracted answer and the reward."""
    by_id = {p.id: p for p in problems}
    rows = []
    for r in rollouts[:limit]:
        context = feedback.get(r.problem_id, r.kind)
        rows.append({"problem_id": r.problem_id, "question": by_id[r.problem_id].question,
                     "gold": by_id[r.problem_id].answer, "kind": r.kind, "rollout_index": r.rollout_index,
                     "context": context.context_text if context else None, "response": r.text,
                     "extracted": r.extracted, "status": r.status, "reward": r.reward,
                     "finish_reason": r.finish_reason, "completion_tokens": len(r.completion_ids),
                     "policy_version": r.policy_version, "context_ids": list(r.context_ids)})
    return rows


def log_completions(run_id: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """A step's rollouts: rows of the run's `completions.json` table and, readable as text, `rollouts/step-<t>.yaml`."""
    from mlflow import MlflowClient

    log_table(run_id, rows, "completions.json", step)
    MlflowClient().log_text(run_id, _readable_yaml(list(rows)), f"rollouts/step-{step:05d}.yaml")


PREDICTION_COLUMNS = ("benchmark", "mode", "sample", "question", "gold", "response", "extracted", "status", "reward",
                      "context", "subject", "level", "problem_id")
"""The columns of the predictions table, in the order it shows them."""


def log_predictions(run_id: str, path: str | Path, step: int) -> None:
    """An evaluation's predictions (the JSONL file `lanpo_core.evaluate` writes): the file under `eval/`, and its rows
    in the run's `eval/predictions.json` table."""
    log_file(run_id, path, "eval")
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    log_table(run_id, [{k: row.get(k) for k in PREDICTION_COLUMNS} for row in rows], "eval/predictions.json", step)


def log_curves(run_id: str, prefixes: tuple[str, ...] = ("rollout/reward_", "eval/"), name: str = "curves.png") -> bool:
    """Plot every metric whose name starts with one of `prefixes` against the step (one panel per prefix) and log
    the PNG as an artifact. Returns False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient()
    keys = sorted(client.get_run(run_id).data.metrics)
    panels = [(p, [k for k in keys if k.startswith(p) and "/time" not in k and "unusable" not in k
                   and "/feedback/" not in k])
              for p in prefixes]
    panels = [(p, ks) for p, ks in panels if ks]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (prefix, ks) in zip(axes[0], panels):
        for key in ks:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            ax.plot([s for s, _ in history], [v for _, v in history], marker="o", label=key.removeprefix(prefix))
        ax.set_title(prefix.rstrip("/_") or "metrics")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        client.log_artifact(run_id, str(path))
    return True


def log_datasets(run_id: str, problem_sets: Sequence[tuple[ProblemSet, str]]) -> None:
    """Record (problem set, context) pairs as the run's dataset inputs: the set's name, its content digest (ids and
    gold answers, `provenance.data_digest` of the set alone) and where it came from, with the context ("training",
    "evaluation"). Logging a set again is a no-op, so every attempt of a run logs them."""
    import mlflow.data
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from tasks.provenance import data_digest

    inputs = []
    for problem_set, context in problem_sets:
        frame = pd.DataFrame([{"id": p.id, "question": p.question, "answer": p.answer} for p in problem_set.problems])
        # a source naming the origin, for files, hub datasets and generated sets alike (MLflow's own guess of a
        # source from a local path warns that the path is ambiguous)
        source = CodeDatasetSource({"origin": problem_set.report.origin})
        dataset = mlflow.data.from_pandas(frame, source=source, name=problem_set.name,
                                          digest=data_digest([(problem_set.name, problem_set.problems)])[:16])
        inputs.append(DatasetInput(Dataset(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    MlflowClient().log_inputs(run_id, datasets=inputs)


LOCAL_UI_PORT = 5000
"""Where `run_link` tells a user to start an MLflow UI when none serves the run's store."""


@dataclass(frozen=True)
class RunLink:
    """A run's page in the MLflow UI."""

    url: str
    command: str | None = None
    """The command that starts the UI `url` points at, when none serves the run's store (None: `url` works now)."""

    def __str__(self) -> str:
        return self.url if self.command is None else f"{self.url} once an MLflow UI runs: {self.command}"

    def markdown(self) -> str:
        link = f"[{self.url}]({self.url})"
        return link if self.command is None else f"{link} once an MLflow UI runs: `{self.command}`"

    def summary(self) -> dict[str, str]:
        """As fields of a flow's summary."""
        return {"mlflow_run_url": self.url} | ({"mlflow_ui_command": self.command} if self.command else {})


def run_link(cfg: RunConfig, run_id: str, served: tuple[str, str] | None = None) -> RunLink:
    """The run's page on the tracking server, on `served` ((store URI, UI URL) of a UI that serves a store, as
    `lanpo services up` runs one) when that is the run's store, else on a UI the returned command starts."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    # `workflowType`: MLflow 3.17's UI shows its GenAI view (traces) unless the URL or the user's last choice says
    # model training, whatever the experiment's kind
    page = (f"/#/experiments/{MlflowClient(uri).get_run(run_id).info.experiment_id}/runs/{run_id}"
            "?workflowType=machine_learning")
    if uri.startswith(("http://", "https://")):
        return RunLink(uri.rstrip("/") + page)
    if served is not None and served[0] == uri:
        return RunLink(served[1].rstrip("/") + page)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = (f"{shlex.quote(str(mlflow) if mlflow.exists() else 'mlflow')} ui --backend-store-uri "
               f"{shlex.quote(uri)} --port {LOCAL_UI_PORT}")
    return RunLink(f"http://127.0.0.1:{LOCAL_UI_PORT}{page}", command)
