"""The long-lived multi-process trainer (`update.placement: trainer`), and the flow's side of its file channel.

    accelerate launch [--num_processes N --cpu | --config_file configs/accelerate/...] -m lanpo_core.trainer \\
        --channel /shared/lanpo-trainer          # or: lanpo trainer --channel ... [accelerate launch flags]

Every rank keeps the policy, TRL trainer, optimiser and scheduler in memory (`update.PolicyUpdater`) across steps and
runs the same update as the flow's process does in place: each step's micro-batches are shared out over the ranks,
the losses keep the step's normaliser and the gradients are averaged over the ranks before the optimiser step
(`PolicyUpdater._prepare` / `_average_gradients`), so N ranks give the weights one process gives, to float
tolerance. Rank 0 writes the checkpoint (`PolicyUpdater.save_checkpoint`: the same format and checksum as in
process) under the run folder named by the request.

The channel is a folder (docs/scale-out.md, "The trainer's channel"):

    heartbeat.json               rank 0, every second: host and pid of each rank, run, step, state, time
    requests/step-000003.json    the flow: the update that makes step 3 (its base policy, config, samples, digest)
    responses/step-000003.json   rank 0, once the checkpoint is on disk: the request's digest, checkpoint path,
                                 checksum and the update's metrics (or the error that stopped the trainer)

Every file is written to a temporary name and renamed into place, so a reader never sees half of one. A request is
answered when a response with its digest exists; a trainer started (or restarted after a crash) resumes from the
newest checkpoint under the run folder and answers whatever request is still unanswered, so a step handed over
twice gives the same checkpoint once. The trainer exits after the run's last step (`grpo.steps`).

Parameter sharding (FSDP, DeepSpeed ZeRO) is refused: every rank holds the whole model (DDP's layout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig
from .runtime import PolicyRef

log = logging.getLogger(__name__)

HEARTBEAT = "heartbeat.json"


class TrainerUnavailable(RuntimeError):
    """The trainer did not answer: no live heartbeat, a timeout, or it failed on the step."""


def request_path(channel: str | Path, step: int) -> Path:
    return Path(channel) / "requests" / f"step-{step:06d}.json"


def response_path(channel: str | Path, step: int) -> Path:
    return Path(channel) / "responses" / f"step-{step:06d}.json"


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to a temporary file beside `path`, fsync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _describe(heartbeat: dict[str, Any] | None, channel: Path) -> str:
    if heartbeat is None:
        return f"the trainer of channel {channel} (no heartbeat: none was started on it?)"
    ranks = heartbeat["ranks"]
    return (f"the trainer of channel {channel} (rank 0 pid {ranks[0]['pid']} on {ranks[0]['host']}, "
            f"{len(ranks)} rank(s), step {heartbeat['step']}, {heartbeat['state']})")


def _liveness_problem(heartbeat: dict[str, Any] | None, liveness_seconds: float) -> str | None:
    """Why the trainer behind `heartbeat` is not alive, or None if it is."""
    if heartbeat is None:
        return "has written no heartbeat"
    rank0 = heartbeat["ranks"][0]
    if rank0["host"] == socket.gethostname() and not _running(rank0["pid"]):  # the surer sign, where it can be seen
        return "is gone (its rank 0 process no longer runs)"
    age = time.time() - heartbeat["time"]
    if age > liveness_seconds:
        return f"has not beaten for {age:.0f} s (update.trainer.liveness_seconds: {liveness_seconds:g})"
    return None


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------------------ the flow's side
def hand_off(cfg: RunConfig, run_dir: str | Path, policy: PolicyRef, samples: Sequence[Any]
             ) -> tuple[PolicyRef, dict[str, float]]:
    """Give the update of `policy` on `samples` (`update.RolloutSample`s) to the trainer of
    `update.trainer.channel` and wait for its checkpoint. Returns the new policy and the update's metrics.

    Raises `TrainerUnavailable`, naming the trainer and the file waited for, when its heartbeat is missing or stale
    (or its process is gone) after `liveness_seconds` of waiting, when no answer came within `timeout_seconds`, or
    when the trainer failed on the step."""
    setting = cfg.update.trainer
    channel = Path(setting.channel)
    step = policy.step + 1
    body = {"step": step, "run_dir": str(Path(run_dir).resolve()), "config": cfg.model_dump(mode="json"),
            "config_digest": cfg.digest(), "policy": asdict(policy), "samples": [asdict(s) for s in samples]}
    body["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    request, response = request_path(channel, step), response_path(channel, step)
    if (read_json(request) or {}).get("digest") != body["digest"]:
        write_json(request, body)
    started = time.monotonic()
    while True:
        answer = read_json(response)
        heartbeat = read_json(channel / HEARTBEAT)
        if answer is not None and answer["request"] == body["digest"]:
            if answer.get("error"):
                raise TrainerUnavailable(f"{_describe(heartbeat, channel)} failed on the update of step {step}: "
                                         f"{answer['error']}")
            return PolicyRef(step, answer["checksum"], answer["checkpoint"]), answer["metrics"]
        waited = time.monotonic() - started
        problem = _liveness_problem(heartbeat, setting.liveness_seconds)
        if problem is not None and waited > setting.liveness_seconds:
            raise TrainerUnavailable(f"{_describe(heartbeat, channel)} {problem}; waited {waited:.0f} s for "
                                     f"{response} (the checkpoint of step {step}, requested in {request}). Start "
                                     f"it with `lanpo trainer --channel {channel}` (docs/scale-out.md); the run "
                                     "resumes at this update")
        if waited > setting.timeout_seconds:
            raise TrainerUnavailable(f"{_describe(heartbeat, channel)} did not write {response} (the checkpoint of "
                                     f"step {step}) within update.trainer.timeout_seconds "
                                     f"({setting.timeout_seconds:g} s)")
        time.sleep(setting.poll_seconds)


# ------------------------------------------------------------------------------------------------ the trainer
class _Heartbeat:
    """Rank 0's heartbeat file, rewritten every `seconds` by a thread (also while a step runs)."""

    def __init__(self, channel: Path, ranks: list[dict[str, Any]], seconds: float) -> None:
        self.path = channel / HEARTBEAT
        self.fields: dict[str, Any] = {"ranks": ranks, "started": time.time(), "state": "starting", "step": None,
                                       "run_dir": None}
        self._stop = threading.Event()
        self._seconds = seconds
        self.beat()
        self._thread = threading.Thread(target=self._run, name="lanpo-trainer-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, **fields: Any) -> None:
        self.fields.update(fields)
        write_json(self.path, {**self.fields, "time": time.time()})

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            self.beat()

    def stop(self, state: str) -> None:
        self._stop.set()
        self._thread.join()
        self.beat(state=state)


class Trainer:
    """One rank of the trainer. Rank 0 reads the channel and tells the other ranks what to do (a broadcast every
    `poll_seconds`, so only rank 0 needs to see the channel); every rank runs the update."""

    def __init__(self, channel: str | Path, poll_seconds: float = 0.5, heartbeat_seconds: float = 1.0) -> None:
        import torch
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        self.channel = Path(channel)
        self.poll_seconds = poll_seconds
        self.state = PartialState(cpu=not torch.cuda.is_available())
        if self.state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(f"the trainer does not shard parameters yet (accelerate config: "
                                      f"{self.state.distributed_type.value}); use a DDP / multi-CPU config "
                                      "(configs/accelerate/, docs/scale-out.md)")
        self.rank, self.ranks = self.state.process_index, self.state.num_processes
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        everyone = self._gather(me)
        self.heartbeat = _Heartbeat(self.channel, everyone, heartbeat_seconds) if self.rank == 0 else None
        self.updater = None
        self.run_dir: str | None = None
        self._answered: dict[Path, tuple[int, int]] = {}  # request file -> (mtime, size) when found answered

    # ------------------------------------------------------------------------------------------ collectives
    def _gather(self, obj: Any) -> list[Any]:
        if self.ranks == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.ranks
        dist.all_gather_object(out, obj)
        return out

    def _from_rank0(self, obj: Any) -> Any:
        if self.ranks == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _beat(self, **fields: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(**fields)

    # ------------------------------------------------------------------------------------------ the loop
    def _pending(self) -> dict[str, Any] | None:
        """(rank 0) The lowest-step request without a response of its digest. A request holds a whole step's samples:
        one answered and unchanged since (same mtime and size) is not read again at every poll."""
        for path in sorted((self.channel / "requests").glob("step-*.json")):
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
            if self._answered.get(path) == version:
                continue
            request = read_json(path)
            answer = read_json(response_path(self.channel, request["step"]))
            if answer is None or answer["request"] != request["digest"]:
                return request
            self._answered[path] = version
        return None

    def serve(self) -> None:
        """Answer requests until the run's last step is done."""
        self._beat(state="idle")
        try:
            while True:
                request = self._from_rank0(self._pending() if self.rank == 0 else None)
                if request is None:
                    time.sleep(self.poll_seconds)
                    continue
                self._answer(request)
                if self.updater.step_count >= self.updater.config.grpo.steps:
                    log.info("trainer: step %d is the run's last; exiting", self.updater.step_count)
                    break
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop("stopped")

    def _answer(self, request: dict[str, Any]) -> None:
        step = request["step"]
        try:
            self._align(request)
            self._beat(state=f"training step {step}", step=self.updater.step_count)
            from .update import RolloutSample

            metrics = self.updater.step([RolloutSample(**s) for s in request["samples"]])
            self._beat(state=f"saving step {step}", step=self.updater.step_count)
            info = self._from_rank0(self.updater.save_checkpoint() if self.rank == 0 else None)
            self.updater.last_checkpoint = info  # every rank knows which checkpoint its weights are
            if self.rank == 0:
                write_json(response_path(self.channel, step),
                           {"request": request["digest"], "step": info.step, "checkpoint": str(info.path),
                            "checksum": info.checksum, "metrics": metrics, "error": None})
                self._beat(state="idle", step=info.step)
        except Exception as e:
            if self.rank == 0:
                write_json(response_path(self.channel, step),
                           {"request": request["digest"], "step": step, "error": f"{type(e).__name__}: {e}"})
            raise

    def _align(self, request: dict[str, Any]) -> None:
        """Make the in-memory policy the request's base policy: build the updater on the first request (resuming from
        the newest checkpoint under the run folder), then restore the base checkpoint if it is another one."""
        from .models import load_policy
        from .update import PolicyUpdater

        run_dir, policy = request["run_dir"], PolicyRef(**request["policy"])
        if self.run_dir is not None and run_dir != self.run_dir:
            raise ValueError(f"this trainer serves the run in {self.run_dir}, not {run_dir}: start one per run")
        if self.updater is None:
            cfg = RunConfig.model_validate(request["config"])
            if cfg.digest() != request["config_digest"]:
                raise ValueError(f"the request's config does not round-trip (digest {cfg.digest()} != "
                                 f"{request['config_digest']})")
            self._beat(state="loading the model", run_dir=run_dir)
            m = cfg.model
            model, tokenizer = load_policy(m.name_or_path, cfg.paths.cache_dir, dtype=m.dtype, revision=m.revision,
                                           trust_remote_code=m.trust_remote_code)
            self.updater = PolicyUpdater.resume(cfg, model, tokenizer, run_dir)
            self.run_dir = run_dir
            log.info("trainer: %d rank(s), run %s, resumed at step %d", self.ranks, run_dir,
                     self.updater.step_count)
        elif self.updater.config.digest() != request["config_digest"]:
            raise ValueError(f"the request's config (digest {request['config_digest']}) is not the one this trainer "
                             f"was started with ({self.updater.config.digest()})")
        current = self.updater.last_checkpoint
        if policy.path is None:
            if self.updater.step_count != 0:
                raise ValueError(f"step {request['step']} starts from the base model, but the run in {run_dir} is at "
                                 f"step {self.updater.step_count}")
        elif current is None or current.checksum != policy.checksum:
            log.info("trainer: restoring %s (step %d)", policy.path, policy.step)
            self.updater.load_checkpoint(policy.path)
        if self.updater.step_count != request["step"] - 1:
            raise ValueError(f"the request for step {request['step']} starts from step {policy.step}, the trainer is "
                             f"at step {self.updater.step_count}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lanpo_core.trainer",
                                     description="The long-lived LANPO trainer; run it under `accelerate launch`.")
    parser.add_argument("--channel", required=True, help="the folder of update.trainer.channel")
    parser.add_argument("--poll-seconds", type=float, default=0.5, help="how often rank 0 looks for a request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Trainer(args.channel, poll_seconds=args.poll_seconds).serve()


if __name__ == "__main__":
    main()
