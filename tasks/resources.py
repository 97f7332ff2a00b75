"""Per-process cache of the heavy objects of a run (model, updater, rollout engine, pool, verifier).

Prefect tasks receive only small, hashable inputs (a `RunHandle`, step numbers, `PolicyRef`s, plain data) and look
the heavy objects up here, so nothing large is ever hashed for a cache key or pickled into a result. Everything
is created lazily, on the first task that really executes: a flow whose tasks all come from the cache never loads
a model.

The in-memory policy is tracked by the `PolicyRef` it holds; `ensure_policy(ref)` makes the weights (and optimiser
state) match `ref`, loading its checkpoint when they do not, e.g. in a new process resuming a killed flow.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanpo_core.config import RunConfig, load_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunHandle:
    """Identifies a lanpo run; the only run-level input of every task."""

    key: str
    """Run folder name, and the MLflow tag that finds the run again."""
    run_dir: str
    config_path: str | None
    overrides: tuple[str, ...]
    digest: str
    """Config digest: part of every cache key."""

    def config(self) -> RunConfig:
        return _config(self.config_path, self.overrides)


_CONFIGS: dict[tuple, RunConfig] = {}


def _config(path: str | None, overrides: tuple[str, ...]) -> RunConfig:
    key = (path, overrides)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_config(path, list(overrides))
    return _CONFIGS[key]


@dataclass(frozen=True)
class PolicyRef:
    """Which weights: the base model (`path is None`) or a checkpoint."""

    step: int
    """LANPO steps completed."""
    checksum: str
    path: str | None = None

    @classmethod
    def base(cls, cfg: RunConfig) -> "PolicyRef":
        # The base model is named by its spec: the bundled one is fixed by its package version, hub models by
        # name + revision. Cheap to compute with nothing loaded (a cached re-run must not load a model).
        m = cfg.model
        return cls(0, f"base:{m.name_or_path}@{m.revision or 'default'}:{m.dtype}:lora={m.lora.enabled}")


@dataclass
class Resources:
    handle: RunHandle
    cfg: RunConfig
    _objects: dict[str, Any] = field(default_factory=dict)
    policy: PolicyRef | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -------------------------------------------------------------------------------------- lazy objects
    def _get(self, name: str, make):
        with self.lock:
            if name not in self._objects:
                self._objects[name] = make()
            return self._objects[name]

    @property
    def updater(self):
        def make():
            from lanpo_core.models import load_policy
            from lanpo_core.update import PolicyUpdater

            m = self.cfg.model
            model, tokenizer = load_policy(m.name_or_path, self.cfg.paths.cache_dir, dtype=m.dtype,
                                           revision=m.revision, trust_remote_code=m.trust_remote_code)
            updater = PolicyUpdater(self.cfg, model, tokenizer, self.handle.run_dir)
            self.policy = PolicyRef.base(self.cfg)
            return updater
        return self._get("updater", make)

    @property
    def tokenizer(self):
        return self.updater.tokenizer

    @property
    def engine(self):
        def make():
            from lanpo_core.rollout import make_engine

            updater = self.updater
            return make_engine(self.cfg, model=updater.model, tokenizer=updater.tokenizer)
        return self._get("engine", make)

    @property
    def pool(self):
        def make():
            from lanpo_core.models import load_embedder
            from lanpo_core.pool import ExperiencePool

            return ExperiencePool.from_config(self.cfg.pool, self.handle.key, self.handle.run_dir,
                                              embedder=load_embedder(self.cfg.pool.embedding_model))
        return self._get("pool", make)

    @property
    def verifier(self):
        def make():
            from lanpo_core.verify import Verifier

            return Verifier.from_config(self.cfg.verify)
        return self._get("verifier", make)

    @property
    def train_problems(self):
        def make():
            from lanpo_core.data import load_problems

            return load_problems(self.cfg.data.train, _base_dir(self.cfg)).problems
        return self._get("train_problems", make)

    @property
    def eval_problems(self) -> dict[str, list]:
        def make():
            from lanpo_core.data import load_problems

            sets = [load_problems(spec, _base_dir(self.cfg)) for spec in self.cfg.data.eval]
            return {s.name: s.problems for s in sets}
        return self._get("eval_problems", make)

    @property
    def abstractor_engine(self):
        """The engine lessons are written with: the policy's own, or a separate fixed model."""
        spec = self.cfg.lanpo.abstraction.abstractor
        if spec == "policy":
            return self.engine

        def make():
            from lanpo_core.models import resolve_policy
            from lanpo_core.rollout import make_engine

            return make_engine(self.cfg, resolve_policy(spec, self.cfg.paths.cache_dir).path)
        return self._get("abstractor_engine", make)

    # ------------------------------------------------------------------------------------------- policy
    def ensure_policy(self, ref: PolicyRef) -> None:
        """Make the in-memory weights (and optimiser state) those of `ref`, loading its checkpoint if needed."""
        updater = self.updater
        with self.lock:
            if self.policy == ref:
                return
            if ref.path is None:
                raise RuntimeError(f"the in-memory policy is {self.policy}, cannot go back to the base model")
            log.info("loading checkpoint %s (step %d)", ref.path, ref.step)
            updater.load_checkpoint(ref.path)
            if "engine" in self._objects:
                self._objects["engine"].sync_from(updater.model)
            self.policy = ref

    def close(self) -> None:
        for name in ("engine", "abstractor_engine", "verifier"):
            obj = self._objects.pop(name, None)
            if obj is not None:
                obj.close()
        self._objects.clear()


def _base_dir(cfg: RunConfig) -> Path | None:
    return Path(cfg.source).parent if cfg.source else None


_RESOURCES: dict[str, Resources] = {}
_LOCK = threading.Lock()


def resources(handle: RunHandle) -> Resources:
    with _LOCK:
        res = _RESOURCES.get(handle.key)
        if res is None or res.handle != handle:
            if res is not None:
                res.close()
            res = _RESOURCES[handle.key] = Resources(handle, handle.config())
        return res


def release(handle: RunHandle) -> None:
    """Close and forget a run's objects (end of a flow run)."""
    with _LOCK:
        res = _RESOURCES.pop(handle.key, None)
    if res is not None:
        res.close()
