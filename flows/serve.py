"""Deployments of the lanpo flows, and the local services users run them with.

`lanpo serve` registers three deployments with the Prefect server at PREFECT_API_URL and serves them from this
process (runs triggered in the Prefect UI execute here):

- `lanpo-train/lanpo`: LANPO training, default config `configs/tiny-cpu.yaml`;
- `lanpo-train/grpo`: the plain-GRPO baseline, default config `configs/grpo-tiny-cpu.yaml`;
- `lanpo-evaluate/evaluate`: zero-shot evaluation of any checkpoint or model.

Their parameters (config, overrides, run name, model) come from the flows' signatures and docstrings, so the UI
renders them as a form.

`lanpo services up` starts, on 127.0.0.1, a Prefect server, a `lanpo serve` process and the MLflow UI over the
default tracking store; `lanpo services down` stops all three. Process ids, the MLflow UI's address and store
(which the flows link their runs to, `served_mlflow_ui`) and logs live in `.lanpo-services/`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES_DIR = Path(os.environ.get("LANPO_SERVICES_DIR", REPO / ".lanpo-services"))
"""State file, logs and the Prefect server's home (env LANPO_SERVICES_DIR, default `.lanpo-services/`)."""
STATE_FILE = SERVICES_DIR / "services.json"
"""`{"pids": {name: pid}, "mlflow_ui": {"url": ..., "store": backend store URI}}` of the running services."""


def deployments():
    from .evaluate import lanpo_evaluate
    from .train import lanpo_train

    return [
        lanpo_train.to_deployment(name="lanpo", parameters={"config": "configs/tiny-cpu.yaml"},
                                  description="LANPO training (tiny CPU defaults; pick any config)."),
        lanpo_train.to_deployment(name="grpo", parameters={"config": "configs/grpo-tiny-cpu.yaml"},
                                  description="Plain GRPO baseline (same pipeline, plain-only rollout mix)."),
        lanpo_evaluate.to_deployment(name="evaluate", parameters={"config": "configs/tiny-cpu.yaml"},
                                     description="Zero-shot evaluation of a checkpoint, folder or hub model."),
    ]


def serve_deployments() -> None:
    os.chdir(REPO)  # relative config paths and the default runs/ and mlruns/ folders resolve in the repository
    served = deployments()  # imports flows.train first, which sets the library defaults Prefect reads at import
    from prefect import serve

    serve(*served, print_starting_message=True)


def wait_http(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _start(name: str, args: list[str], env: dict[str, str]) -> int:
    SERVICES_DIR.mkdir(exist_ok=True)
    log = open(SERVICES_DIR / f"{name}.log", "ab")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)  # own process group: `down` stops its children too
    return proc.pid


def services_up(prefect_port: int = 4200, mlflow_port: int = 5000, timeout: float = 120.0) -> dict[str, str]:
    """Start the Prefect server, the deployment server and the MLflow UI on 127.0.0.1; return their URLs."""
    if STATE_FILE.exists():
        raise RuntimeError(f"services already recorded in {STATE_FILE}; run `lanpo services down` first")
    # Unless the user's environment says otherwise: telemetry off (as in flows/train.py), and no job runner in the
    # MLflow server (a runner and 7 huey consumers, 1.6 GiB here, for GenAI jobs such as judges that nothing here
    # submits).
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
           "PREFECT_HOME": str(SERVICES_DIR / "prefect-home")}
    bin_dir = Path(sys.executable).parent
    api = f"http://127.0.0.1:{prefect_port}/api"
    pids = {"prefect-server": _start("prefect-server", [str(bin_dir / "prefect"), "server", "start", "--host",
                                                        "127.0.0.1", "--port", str(prefect_port)], env)}
    STATE_FILE.write_text(json.dumps({"pids": pids}))
    if not wait_http(f"{api}/health", timeout):
        services_down()
        raise RuntimeError(f"the Prefect server did not answer on {api} within {timeout:.0f}s; "
                           f"see {SERVICES_DIR / 'prefect-server.log'}")
    env["PREFECT_API_URL"] = api
    pids["lanpo-serve"] = _start("lanpo-serve", [sys.executable, "-m", "flows.serve"], env)
    backend = os.environ.get("MLFLOW_TRACKING_URI")
    if not backend:  # the store the flows write to by default (tasks/tracking.py), from the repository folder
        (REPO / "mlruns").mkdir(exist_ok=True)
        backend = f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    pids["mlflow-ui"] = _start("mlflow-ui", [str(bin_dir / "mlflow"), "server", "--backend-store-uri", backend,
                                             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                               env)
    STATE_FILE.write_text(json.dumps({"pids": pids}))
    mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
    if not wait_http(f"{mlflow_ui}/health", timeout):
        services_down()
        raise RuntimeError(f"the MLflow UI did not start within {timeout:.0f}s; see {SERVICES_DIR / 'mlflow-ui.log'}")
    STATE_FILE.write_text(json.dumps({"pids": pids, "mlflow_ui": {"url": mlflow_ui, "store": backend}}))
    return {"prefect_ui": f"http://127.0.0.1:{prefect_port}", "prefect_api": api, "mlflow_ui": mlflow_ui}


def served_mlflow_ui() -> tuple[str, str] | None:
    """(backend store URI, UI URL) of the MLflow UI `services_up` started, while it runs."""
    try:
        state = json.loads(STATE_FILE.read_text())
        os.kill(state["pids"]["mlflow-ui"], 0)
        return state["mlflow_ui"]["store"], state["mlflow_ui"]["url"]
    except (OSError, ValueError, KeyError):  # no services, a UI that died, or one still starting
        return None


def services_down() -> list[str]:
    """Stop everything `services_up` started (whole process groups); returns what was stopped."""
    if not STATE_FILE.exists():
        return []
    stopped = []
    state = json.loads(STATE_FILE.read_text())
    for name, pid in state.get("pids", state).items():  # a bare {name: pid} file: services started by older code
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.killpg(pid, 0)
                time.sleep(0.1)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(name)
    STATE_FILE.unlink()
    return stopped


if __name__ == "__main__":
    serve_deployments()
