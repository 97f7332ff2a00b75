"""The heavy objects of one run (policy and updater, rollout engines, pool, verifier, held-out data), made on first use.

`Runtime` is the one owner of the policy's weights: they change only in `ensure_policy` (restore a checkpoint) and in
`apply_update` (an update, its checkpoint, the engine sync; or, with `update.placement: trainer`, the trainer's update
and the load of its checkpoint), and both keep the rollout engine in step. Which weights
are loaded is tracked as a `PolicyRef`, the small value that stages pass to each other instead of a model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import RunConfig

log = logging.getLogger(__name__)


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


def data_dir(cfg: RunConfig) -> Path | None:
    """Where relative data paths of `cfg` resolve: beside its file (None: the working directory)."""
    return Path(cfg.source).parent if cfg.source else None


def load_train_problems(cfg: RunConfig) -> list:
    from .data import load_problems

    return load_problems(cfg.data.train, data_dir(cfg)).problems


class Runtime:
    """What the stages of one run act on. `run_key` names the run in the pool (default: the run folder's name)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, run_key: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_key = run_key or self.run_dir.name
        self.policy: PolicyRef | None = None
        """The weights in memory (None until the updater is made)."""
        self._objects: dict[str, Any] = {}
        self.lock = threading.RLock()

    def _get(self, name: str, make: Callable[[], Any]) -> Any:
        with self.lock:
            if name not in self._objects:
                self._objects[name] = make()
            return self._objects[name]

    # ------------------------------------------------------------------------------------------ objects
    @property
    def updater(self):
        def make():
            from .models import load_policy
            from .update import PolicyUpdater

            m = self.cfg.model
            model, tokenizer = load_policy(m.name_or_path, self.cfg.paths.cache_dir, dtype=m.dtype,
                                           revision=m.revision, trust_remote_code=m.trust_remote_code)
            updater = PolicyUpdater(self.cfg, model, tokenizer, self.run_dir)
            self.policy = PolicyRef.base(self.cfg)
            return updater
        return self._get("updater", make)

    @property
    def tokenizer(self):
        return self.updater.tokenizer

    @property
    def engine(self):
        """The policy's rollout engine (it reads the updater's weights)."""
        def make():
            from .rollout import make_engine

            return make_engine(self.cfg, model=self.updater.model, tokenizer=self.updater.tokenizer)
        return self._get("engine", make)

    @property
    def abstractor_engine(self):
        """The engine lessons are written with: the policy's own, or a separate fixed model."""
        spec = self.cfg.lanpo.abstraction.abstractor
        if spec == "policy":
            return self.engine

        def make():
            from .models import resolve_policy
            from .rollout import make_engine

            return make_engine(self.cfg, resolve_policy(spec, self.cfg.paths.cache_dir).path)
        return self._get("abstractor_engine", make)

    @property
    def pool(self):
        def make():
            from .models import load_embedder
            from .pool import ExperiencePool

            return ExperiencePool.from_config(self.cfg.pool, self.run_key, str(self.run_dir),
                                              embedder=load_embedder(self.cfg.pool.embedding_model))
        return self._get("pool", make)

    @property
    def verifier(self):
        def make():
            from .verify import Verifier

            return Verifier.from_config(self.cfg.verify)
        return self._get("verifier", make)

    @property
    def eval_problems(self) -> dict[str, list]:
        def make():
            from .data import load_problems

            sets = [load_problems(spec, data_dir(self.cfg)) for spec in self.cfg.data.eval]
            return {s.name: s.problems for s in sets}
        return self._get("eval_problems", make)

    # ------------------------------------------------------------------------------------------- policy
    def ensure_policy(self, ref: PolicyRef) -> None:
        """Make the in-memory weights (and optimiser state) those of `ref`, restoring its checkpoint if needed."""
        updater = self.updater
        with self.lock:
            if self.policy == ref:
                return
            if ref.path is None:
                raise RuntimeError(f"the in-memory policy is {self.policy}, cannot go back to the base model")
            log.info("loading checkpoint %s (step %d)", ref.path, ref.step)
            # with a trainer elsewhere, this process only serves its weights to the rollout engine
            updater.load_checkpoint(ref.path, weights_only=self.cfg.update.placement == "trainer")
            self._sync_engine()
            self.policy = ref

    def apply_update(self, samples: Sequence[Any], policy: PolicyRef) -> tuple[PolicyRef, dict[str, float]]:
        """One update of `policy` on `samples`, its checkpoint, and the engine sync. In process (`update.placement`)
        the in-memory policy is updated; with `grpo.checkpoint_background` the checkpoint is written while the next
        stages run (the next save, a checkpoint load and `close` wait for it). With `placement: trainer` the step is
        handed to the running trainer, which writes the checkpoint, and its weights are then loaded here for the
        engine. Returns the new policy and the update's metrics, with `time/update_seconds` (the trainer's whole
        round trip) and `time/sync_seconds` (checkpoint write or snapshot, or the load of the trainer's, plus engine
        sync)."""
        with self.lock:
            started = time.perf_counter()
            if self.cfg.update.placement == "trainer":
                from .trainer import hand_off

                new, metrics = hand_off(self.cfg, self.run_dir, policy, samples)
                updated = time.perf_counter()
                self.ensure_policy(new)
                return self._update_result(metrics, started, updated)
            self.ensure_policy(policy)
            metrics = self.updater.step(samples)
            updated = time.perf_counter()
            info = self.updater.save_checkpoint(background=self.cfg.grpo.checkpoint_background)
            self.policy = PolicyRef(info.step, info.checksum, str(info.path))
            self._sync_engine()
            return self._update_result(metrics, started, updated)

    def _update_result(self, metrics: dict[str, float], started: float, updated: float
                       ) -> tuple[PolicyRef, dict[str, float]]:
        metrics = {f"update/{k}": v for k, v in metrics.items()}
        metrics["time/update_seconds"] = updated - started
        metrics["time/sync_seconds"] = time.perf_counter() - updated
        return self.policy, metrics

    def wait_checkpoint(self) -> None:
        """Block until the latest checkpoint is on disk (raises if its write failed)."""
        if "updater" in self._objects:
            self._objects["updater"].wait_checkpoint()

    def _sync_engine(self) -> None:
        if "engine" in self._objects:
            self._objects["engine"].sync_from(self.updater.model)

    def close(self) -> None:
        """Wait for the checkpoint write, then close the engines and the verifier."""
        try:
            self.wait_checkpoint()
        finally:
            for name in ("engine", "abstractor_engine", "verifier"):
                obj = self._objects.pop(name, None)
                if obj is not None:
                    obj.close()
            self._objects.clear()
