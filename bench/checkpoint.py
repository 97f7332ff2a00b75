"""Benchmark of checkpoint writes taken off the training step's critical path (`PolicyUpdater.save_checkpoint`).

    .venv/bin/python bench/checkpoint.py [--model smollm2-135m-instruct] [--repeats 3]
                                         [--out bench/results/checkpoint.json]

Set-up: the bundled SmolLM2-135M-Instruct in fp32, full fine-tuning, after one real update (so AdamW holds its
moments); the run folder is a temporary folder (`--run-dir` to choose the disk). Each save writes the next step
(keep-last 2, so from the third save on the writer also deletes the oldest checkpoint, as in a run). Measured
`--repeats` times, medians reported:

* snapshot parts (the caller waits for these): copying the weights, `optimizer.state_dict()` plus its copy, the
  tensor checksum, the RNG states;
* `foreground`: `save_checkpoint()`, snapshot + write + fsync + rename;
* `background`: `save_checkpoint(background=True)` until it returns (caller blocked), then until `wait_checkpoint()`
  returns (on disk), nothing else running in this process;
* `overlap`: the policy's no-grad forward pass (`--batch` x `--tokens`) timed alone, then back to back while a
  background write runs; the slowdown is the mean forward time during the write over the mean alone, minus 1.
  The write's own time to disk under that load is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def samples(vocab: int, seed: int = 0):
    """Two groups of four plain rollouts with mixed rewards: enough for one real AdamW step."""
    from lanpo_core.update import RolloutSample

    rng = random.Random(seed)
    out = []
    for g in range(2):
        prompt = [rng.randrange(200, vocab) for _ in range(24)]
        for j in range(4):
            out.append(RolloutSample(f"p{g}", "plain", prompt, [rng.randrange(200, vocab) for _ in range(16)], None,
                                     float(j % 2), False))
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="policy spec or folder (load_policy)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="overlap workload: sequences per forward pass")
    ap.add_argument("--tokens", type=int, default=128, help="overlap workload: tokens per sequence")
    ap.add_argument("--run-dir", default=None, help="parent folder of the temporary run folder")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpoint.json"))
    a = ap.parse_args()

    import torch

    from lanpo_core.checkpoint import capture_rng_state, tensors_checksum, verify_checkpoint
    from lanpo_core.config import RunConfig
    from lanpo_core.models import load_policy
    from lanpo_core.update import PolicyUpdater

    load_start = os.getloadavg()
    cfg = RunConfig.model_validate({"grpo": {"bf16": False, "micro_batch_size": 8, "checkpoint_keep_last": 2}})
    model, tok = load_policy(a.model)
    params = sum(p.numel() for p in model.parameters())
    run_dir = Path(tempfile.mkdtemp(prefix="lanpo-bench-checkpoint-", dir=a.run_dir))
    up = PolicyUpdater(cfg, model, tok, run_dir)
    up.step(samples(len(tok)))
    up.model.eval()
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    def next_step() -> None:
        # every save writes a new step folder, as after each update in a run (the weights need not change for this)
        up.step_count += 1

    ids = torch.randint(200, len(tok), (a.batch, a.tokens))

    @torch.no_grad()
    def forward() -> float:
        return timed(lambda: up.model(input_ids=ids, logits_to_keep=1))[0]

    forward()  # warm-up
    for _ in range(a.repeats):
        # snapshot parts, as save_checkpoint runs them
        inner = up._unwrapped()
        t, (weights, written) = timed(lambda: up._weights_snapshot(inner, copy=True))
        record("snapshot: copy weights", t)
        t, state = timed(lambda: up.optimizer.state_dict())
        record("snapshot: optimizer.state_dict()", t)
        t, _ = timed(lambda: up._copy_state(state))
        record("snapshot: copy optimizer state", t)
        t, _ = timed(lambda: tensors_checksum(written))
        record("snapshot: checksum (in memory)", t)
        t, _ = timed(capture_rng_state)
        record("snapshot: RNG states", t)
        del weights, written, state, _

        next_step()
        t, info = timed(up.save_checkpoint)
        record("foreground save_checkpoint()", t)
        t, _ = timed(lambda: verify_checkpoint(info.path))
        record("verify_checkpoint (from disk)", t)

        next_step()
        t0 = time.perf_counter()
        info = up.save_checkpoint(background=True)
        record("background: caller blocked", time.perf_counter() - t0)
        up.wait_checkpoint()
        record("background: until on disk", time.perf_counter() - t0)

        alone = [forward() for _ in range(4)]
        record("forward pass alone", statistics.mean(alone))
        next_step()
        t0 = time.perf_counter()
        info = up.save_checkpoint(background=True)
        blocked = time.perf_counter() - t0
        during = [forward()]  # at least one, started while the write runs
        while not (info.path / "state.json").is_file():  # published (the writer prunes after this, briefly)
            during.append(forward())
        up.wait_checkpoint()
        record("overlap: caller blocked", blocked)
        record("overlap: until on disk", time.perf_counter() - t0)
        record("overlap: forward passes during the write", float(len(during)))
        record("forward pass during the write", statistics.mean(during))
        record("overlap: forward slowdown", statistics.mean(during) / statistics.mean(alone) - 1)

    med = {k: statistics.median(v) for k, v in rows.items()}
    load_end = os.getloadavg()
    header = (f"{a.model}: {params / 1e6:.1f} M parameters fp32, full fine-tuning (AdamW); CPU {cpu_model()}, "
              f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; load average "
              f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; forward {a.batch} x {a.tokens} tokens; "
              f"median of {a.repeats}; peak RSS {peak_rss_gb():.2f} GB")
    lines = ["| measurement | median | each |", "|---|---|---|"]
    for k, v in rows.items():
        if k == "overlap: forward slowdown":
            lines.append(f"| {k} | {100 * med[k]:+.1f} % | " + ", ".join(f"{100 * x:+.1f} %" for x in v) + " |")
        elif k.startswith("overlap: forward passes"):
            lines.append(f"| {k} | {med[k]:.0f} | " + ", ".join(f"{x:.0f}" for x in v) + " |")
        else:
            lines.append(f"| {k} | {med[k]:.3f} s | " + ", ".join(f"{x:.3f}" for x in v) + " |")
    table = "\n".join(lines)
    print(header)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "table": table, "median": med, "runs": rows,
                               "cpu": cpu_model(), "load_average_start": load_start, "load_average_end": load_end,
                               "model": a.model, "parameters": params, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                              indent=2))
    print(f"wrote {out}")
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
