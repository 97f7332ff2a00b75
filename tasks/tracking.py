"""MLflow tracking for lanpo runs: one parent run per flow run, MLflow-safe metric names, offline default store.

A parent run ends FINISHED, FAILED (an error) or KILLED (Ctrl-C, SIGTERM); a run whose process died without
ending it (SIGKILL) is ended KILLED when the run is resumed, and the lost attempt is recorded in its tags.

Default store: a SQLite file under `mlruns/` (in the current directory), with artifacts beside it in
`mlruns/artifacts`, so tracking works with no server; `tracking.mlflow_tracking_uri` or the env variable
MLFLOW_TRACKING_URI point it anywhere else (an `mlflow server`, Databricks, ...).

A run records its problem sets as dataset inputs (content digests) and, unless `tracking.system_metrics` is off,
MLflow's system metrics. `run_link` is the run's page in the MLflow UI (or the command that starts a UI on it).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from lanpo_core import hardware
from lanpo_core.config import RunConfig

if TYPE_CHECKING:
    from lanpo_core.data import ProblemSet

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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


def _end_dead_attempt(run_id: str) -> None:
    """A run left RUNNING by a process that died without ending it (SIGKILL, OOM killer, power loss) is ended KILLED
    and the lost attempt recorded, before the new attempt sets it RUNNING again."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return
    alive = _attempt_alive(run.data.tags)
    if alive is None:
        return
    if alive:
        log.warning("MLflow run %s is RUNNING in live process %s: two attempts of the same run are logging into it",
                    run_id, run.data.tags["lanpo_pid"])
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
    """Start (or resume) the parent MLflow run of a lanpo run; yields its id. The run ends FINISHED, FAILED (an
    error) or KILLED (a signal); one an earlier attempt's dead process left RUNNING is first ended KILLED."""
    import mlflow

    exp = experiment_id(cfg)
    existing = find_run(cfg, run_key)
    if existing is not None:
        _end_dead_attempt(existing)
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
            params = {safe_name(k): ("" if v is None else str(v))[:6000]
                      for k, v in {**cfg.flat(), **precision}.items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps one batch at 100 params
                mlflow.log_params(dict(items[i:i + 100]))
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


def log_curves(run_id: str, prefixes: tuple[str, ...] = ("rollout/reward_", "eval/"), name: str = "curves.png") -> bool:
    """Plot every metric whose name starts with one of `prefixes` against the step (one panel per prefix) and log
    the PNG as an artifact. Returns False when there is nothing to plot."""
    import tempfile

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
