"""Benchmark of the rollout engines (lanpo_core/rollout/), all measured in one run on the default model.

    .venv/bin/python bench/rollout.py [--prompts 16] [--n 8] [--max-new-tokens 128] [--cycles 30]
                                      [--out bench/results/rollout.json]

Workload: 16 prompts x n=8 samples, up to 128 new tokens (prompts ask for explanations, so most completions run to
64-128 tokens), temperature 1, the bundled SmolLM2-135M-Instruct. Throughput = generated tokens (EOS included) /
wall time of the `generate` call, after one warm-up call per backend (the first call of each pays one-off costs,
reported separately as `first_call_s`).

Phases, in this order:
1. `naive`: a per-prompt loop of transformers `model.generate(num_return_sequences=n)` (fp32, the model as loaded).
2. `transformers`: our TransformersEngine on the same model (batched, left-padded, raw log-probs recorded).
3. `vllm`: our VllmEngine with the config defaults (bf16, eager): engine start time, throughput, weight sync
   (`sync_from` the fp32 transformers model, in place) timed 5 times, log-prob agreement of bf16 vLLM with a fp32
   forward pass, then `--cycles` generate+sync cycles (4 prompts x 4 samples x 32 tokens each) with the resident
   memory (main process + engine processes) at the start and the end, and close time plus the processes left.
Peak memory: summed RSS of this process and its children, sampled every 0.25 s, per phase and overall.
The machine's load average is recorded: other work on the CPU slows every phase (ratios in one run are comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

TOPICS = ["why the sky is blue", "how a bicycle stays upright", "how to add two fractions", "what a prime number is",
          "how rain forms", "why we have seasons", "how a computer stores numbers", "what photosynthesis does",
          "how to find the area of a circle", "why ice floats", "how vaccines work", "what gravity is",
          "how to multiply two-digit numbers", "why the moon has phases", "how a rainbow forms", "what an atom is",
          "how bees make honey", "what inflation means", "how a lever works", "why leaves change colour"]


def tree_rss_mb() -> float:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class PeakMemory:
    """Samples the summed RSS of this process tree in a thread; `mark(name)` starts a new phase."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.phase, self.peaks = every, "setup", {"setup": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_mb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self._stop.wait(self.every)

    def mark(self, phase: str) -> None:
        self.phase = phase
        self.peaks.setdefault(phase, 0.0)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v) for k, v in self.peaks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout.json"))
    args = ap.parse_args()

    import torch

    from lanpo_core.config import RunConfig
    from lanpo_core.models import load_policy
    from lanpo_core.rollout import RolloutRequest, SamplingSpec, TransformersEngine, make_engine

    load_start = os.getloadavg()
    mem = PeakMemory()
    cfg = RunConfig()
    cfg.rollout.backend = "vllm"
    model, tokenizer = load_policy(cfg.model.name_or_path, dtype=cfg.model.dtype)
    model.eval()
    requests = [RolloutRequest(messages=[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]}."}],
                               n=args.n, tags={"i": i}) for i in range(args.prompts)]
    sampling = SamplingSpec(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    warm = [RolloutRequest(messages=[{"role": "user", "content": "Say hi."}], n=2)]
    warm_s = SamplingSpec(temperature=1.0, max_new_tokens=8, seed=1)
    results: dict = {"config": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                                "temperature": 1.0, "model": cfg.model.name_or_path, "hf_dtype": cfg.model.dtype,
                                "vllm_dtype": cfg.rollout.vllm.dtype, "torch_threads": torch.get_num_threads(),
                                "cpus": len(os.sched_getaffinity(0))}}

    def record(name: str, tokens: int, secs: float, seqs: int, **extra) -> None:
        results[name] = {"tokens": tokens, "seconds": round(secs, 2), "tok_per_s": round(tokens / secs, 1),
                         "mean_completion_tokens": round(tokens / seqs, 1), **extra}
        print(f"{name:>13}: {tokens} tokens in {secs:.1f}s = {tokens / secs:.1f} tok/s", flush=True)

    # 1. naive per-prompt loop -------------------------------------------------------------------------------
    mem.mark("naive")
    eos = tokenizer.eos_token_id

    def naive(reqs, s):
        tokens = 0
        for r in reqs:
            ids = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            with torch.inference_mode():
                out = model.generate(**ids, do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=s.max_new_tokens, num_return_sequences=r.n, pad_token_id=eos)
            new = out[:, ids["input_ids"].shape[1]:]
            for row in new.tolist():  # count up to and including the first EOS
                tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    t = time.perf_counter()
    naive(warm, warm_s)
    first = time.perf_counter() - t
    torch.manual_seed(0)
    t = time.perf_counter()
    tokens = naive(requests, sampling)
    record("naive", tokens, time.perf_counter() - t, args.prompts * args.n, first_call_s=round(first, 2))

    # 2. transformers backend --------------------------------------------------------------------------------
    mem.mark("transformers")
    hf = TransformersEngine(model, tokenizer, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                            batch_size=cfg.rollout.transformers_batch_size, progress=False)
    t = time.perf_counter()
    hf.generate(warm, warm_s)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = hf.generate(requests, sampling)
    record("transformers", sum(c.num_tokens for c in out), time.perf_counter() - t, len(out),
           first_call_s=round(first, 2), batch_size=hf.batch_size)
    hf.close()

    # 3. vLLM backend ----------------------------------------------------------------------------------------
    mem.mark("vllm_start")
    t = time.perf_counter()
    engine = make_engine(cfg)
    results["vllm_start_s"] = round(time.perf_counter() - t, 1)
    print(f"vLLM engine start: {results['vllm_start_s']}s (pids {engine.pids})", flush=True)
    mem.mark("vllm_generate")
    t = time.perf_counter()
    engine.generate(warm, warm_s)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = engine.generate(requests, sampling)
    record("vllm", sum(c.num_tokens for c in out), time.perf_counter() - t, len(out), first_call_s=round(first, 2))

    # log-prob agreement of the bf16 engine with a fp32 forward pass (what the off-policy correction compares)
    diffs, seq_diffs = [], []
    for c in out[:: args.n][:8]:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(c.prompt_ids) - 1: -1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.completion_ids)[:, None])[:, 0]
        d = torch.tensor(c.logprobs) - ref
        diffs.append(d.abs())
        seq_diffs.append(abs(d.sum().item()))
    d = torch.cat(diffs)
    results["vllm_logprob_vs_fp32_forward"] = {
        "mean_abs_per_token": round(d.mean().item(), 4), "max_abs_per_token": round(d.max().item(), 4),
        "mean_abs_per_sequence_sum": round(statistics.mean(seq_diffs), 3), "sequences": len(seq_diffs)}

    mem.mark("vllm_sync")
    syncs = [engine.sync_from(model) for _ in range(5)]
    results["weight_sync_s"] = {"mean": round(statistics.mean(syncs), 2), "max": round(max(syncs), 2),
                                "all": [round(s, 2) for s in syncs], "mode": engine.sync_mode}
    print(f"weight sync: {results['weight_sync_s']}", flush=True)

    mem.mark("vllm_cycles")
    small = requests[:4]
    small = [RolloutRequest(messages=r.messages, n=4, tags=r.tags) for r in small]
    rss_start = tree_rss_mb()
    cycle_s = []
    for k in range(args.cycles):
        t = time.perf_counter()
        engine.generate(small, SamplingSpec(temperature=1.0, max_new_tokens=32, seed=k))
        engine.sync_from(model)
        cycle_s.append(time.perf_counter() - t)
    rss_end = tree_rss_mb()
    results["cycles"] = {"count": args.cycles, "rss_start_mb": round(rss_start), "rss_end_mb": round(rss_end),
                         "rss_growth_mb": round(rss_end - rss_start),
                         "mean_cycle_s": round(statistics.mean(cycle_s), 2)}
    print(f"{args.cycles} generate+sync cycles: RSS {rss_start:.0f} -> {rss_end:.0f} MB", flush=True)

    mem.mark("close")
    pids = engine.pids
    t = time.perf_counter()
    engine.close()
    import psutil

    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    results["close"] = {"seconds": round(time.perf_counter() - t, 1), "engine_pids": pids, "left_running": left,
                        "children_after": [p.pid for p in psutil.Process().children(recursive=True)]}
    results["peak_rss_mb"] = mem.stop()
    results["peak_rss_mb_overall"] = max(results["peak_rss_mb"].values())
    results["load_average"] = {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]}
    results["speedup"] = {"vllm_vs_naive": round(results["vllm"]["tok_per_s"] / results["naive"]["tok_per_s"], 2),
                          "transformers_vs_naive": round(results["transformers"]["tok_per_s"]
                                                         / results["naive"]["tok_per_s"], 2),
                          "vllm_vs_transformers": round(results["vllm"]["tok_per_s"]
                                                        / results["transformers"]["tok_per_s"], 2)}

    print("\n| engine | tok/s | tokens | seconds | mean len | x naive | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, phase in (("naive", "naive"), ("transformers", "transformers"), ("vllm", "vllm_generate")):
        r = results[name]
        print(f"| {name} | {r['tok_per_s']} | {r['tokens']} | {r['seconds']} | {r['mean_completion_tokens']} | "
              f"{r['tok_per_s'] / results['naive']['tok_per_s']:.2f} | {results['peak_rss_mb'].get(phase)} |")
    lp = results["vllm_logprob_vs_fp32_forward"]
    print(f"\nvLLM start {results['vllm_start_s']} s; weight sync mean {results['weight_sync_s']['mean']} s "
          f"(max {results['weight_sync_s']['max']}, {results['weight_sync_s']['mode']}); close "
          f"{results['close']['seconds']} s, processes left {results['close']['left_running']}")
    print(f"{args.cycles} cycles: RSS {results['cycles']['rss_start_mb']} -> {results['cycles']['rss_end_mb']} MB; "
          f"peak RSS overall {results['peak_rss_mb_overall']} MB")
    print(f"bf16 vLLM log-probs vs fp32 forward: mean |d| {lp['mean_abs_per_token']}/token, max "
          f"{lp['max_abs_per_token']}, mean |sum d| {lp['mean_abs_per_sequence_sum']}/sequence")
    print(f"load average start {results['load_average']['start']} end {results['load_average']['end']}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
