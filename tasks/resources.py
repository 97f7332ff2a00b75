"""Per-process registry of a run's `Runtime` (lanpo_core/runtime.py), looked up by the run's `RunHandle`.

Prefect tasks receive only small, hashable inputs (a `RunHandle`, step numbers, `PolicyRef`s, plain data) and look
the heavy objects up here, so nothing large is ever hashed for a cache key or pickled into a result. A runtime makes
its objects on the first task that really executes: a flow whose tasks all come from the cache never loads a model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lanpo_core.config import RunConfig
from lanpo_core.runtime import Runtime


@dataclass(frozen=True)
class RunHandle:
    """Identifies a lanpo run and carries its config; the only run-level input of every task."""

    key: str
    """Run folder name, and the MLflow tag that finds the run again."""
    run_dir: str
    config_json: str
    """The run's whole config: a task rebuilds it from this alone, in whichever process it runs."""
    source: str | None
    """The config file it was read from (relative data paths resolve beside it); None for an in-memory config."""
    digest: str
    """Config digest: part of every cache key."""

    @classmethod
    def for_run(cls, cfg: RunConfig, run_dir: str | Path) -> "RunHandle":
        return cls(Path(run_dir).name, str(run_dir), cfg.model_dump_json(), cfg.source, cfg.digest())

    def config(self) -> RunConfig:
        cfg = RunConfig.model_validate_json(self.config_json)
        cfg.source = self.source
        if cfg.digest() != self.digest:
            raise ValueError(f"run {self.key}: its config does not round-trip (digest {cfg.digest()} != {self.digest})")
        return cfg


_RUNTIMES: dict[str, tuple[RunHandle, Runtime]] = {}
_LOCK = threading.Lock()


def runtime(handle: RunHandle) -> Runtime:
    """The run's runtime in this process (made on first use; a new handle for the same key replaces it)."""
    with _LOCK:
        known = _RUNTIMES.get(handle.key)
        if known is None or known[0] != handle:
            if known is not None:
                known[1].close()
            known = _RUNTIMES[handle.key] = (handle, Runtime(handle.config(), handle.run_dir, handle.key))
        return known[1]


def release(handle: RunHandle) -> None:
    """Wait for the run's checkpoint write, close and forget its objects (end of a flow run)."""
    with _LOCK:
        known = _RUNTIMES.pop(handle.key, None)
    if known is not None:
        known[1].close()
