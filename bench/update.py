"""Benchmark of the LANPO policy update against its FLOP estimate and TRL's own GRPOTrainer step, in one run.

    .venv/bin/python bench/update.py [--steps 3] [--dtypes auto] [--modes ours,ours_all,trl_same,trl_gen]

`--dtypes` takes `auto` (the config default: bf16 autocast where bf16 is native, else fp32), `fp32` and `bf16`.

Default model (bundled SmolLM2-135M-Instruct), B=8 problems x G=8 rollouts, completions up to 64 tokens.

1. `gen` (once): sample the step's rollouts with HF generate from the real model: per problem 4 plain, 2 reflection and
   2 abstraction rollouts (METHOD.md's default mix), raw sampling log-probs, lenient last-integer reward.
2. For each dtype (fp32 master weights; `bf16` = CPU bf16 autocast), each in its own process (so peak RSS, read from
   /proc VmHWM, is per configuration):
   * `ours`       PolicyUpdater.step on those rollouts (train_prompt plain, the default off-policy estimator, drop
                  negatives). It skips zero-signal sequences (all-equal groups, dropped negatives), a LANPO rule.
   * `ours_all`   the same with every sequence trained: rewards jittered so no group is all-equal, negatives kept,
                  so every sequence is run (worst case for our engine).
   * `trl_same`   TRL GRPOTrainer.train() fed the *same* plain-prompt token ids through its `rollout_func` hook
                  (identical tokens, 64 sequences trained); its (near-zero) generation + scoring time is subtracted.
   * `trl_gen`    TRL GRPOTrainer.train() as users run it: it generates its own 64 completions (HF generate,
                  T=1, up to 64 tokens) from the same 8 prompts; generation + scoring time is subtracted.
   Step time = wall time of a whole optimiser step (TRL: on_step_begin -> on_step_end callbacks; ours: step()).
   TRL's generation time is measured around `_generate_and_score_completions` (what TRL's profiler reports as
   `_prepare_inputs`; its profiling metrics go only to wandb/mlflow, so we time the same call directly).
3. The machine's fp32 matmul rate (bench/main_job.py's probe, before and after each of our workers, so it is
   measured under the same load) gives the FLOP estimate of our update: 6 x matmul parameters x trained prompt +
   completion tokens. The table shows update time / estimate: the median over the steps after the first (which
   includes one-off set-up) at the mean probe, and in brackets the fastest such step at the faster probe (on shared
   cores the closest to an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from main_job import matmul_params, matmul_probe  # noqa: E402  (bench/ is the script's folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

B, G, MAX_NEW = 8, 8, 64
MIX = ["plain"] * 4 + ["reflection"] * 2 + ["abstraction"] * 2
SOLVE = "Reason step by step, and put your final answer within \\boxed{}."
LESSONS = ("Lessons from similar problems:\n- Add the ones first, then carry if the sum is ten or more.\n"
           "- Check the result by subtracting one number from it.\n- End with the final answer in \\boxed{}.")


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def last_int(text: str) -> str | None:
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    return list(tok(text, add_special_tokens=False).input_ids)


def problems(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in range(B):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"id": f"q{k}", "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


# --------------------------------------------------------------------------------------------- rollouts
def worker_gen(out: Path) -> dict:
    import torch

    from lanpo_core.models import load_policy

    torch.manual_seed(0)
    model, tok = load_policy("smollm2-135m-instruct")
    model.eval()
    tok.padding_side = "left"
    probs = problems()

    def generate(prompts: list[list[int]]):
        pmax = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), pmax), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, pmax - len(p):] = torch.tensor(p)
            mask[i, pmax - len(p):] = 1
        with torch.no_grad():  # fp32: bf16 matmuls were slower than fp32 on this CPU under load
            res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=MAX_NEW, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        seqs = res.sequences[:, pmax:]
        logps = torch.stack([torch.log_softmax(lg.float(), -1) for lg in res.logits], 1)  # raw logits, T=1
        outs = []
        for i in range(len(prompts)):
            comp, lps = [], []
            for t in range(seqs.size(1)):
                token = int(seqs[i, t])
                comp.append(token)
                lps.append(float(logps[i, t, token]))
                if token == tok.eos_token_id:
                    break
            outs.append((comp, lps))
        return outs

    t0 = time.perf_counter()
    plain_prompts = {p["id"]: chat_ids(tok, f"{p['question']} {SOLVE}") for p in probs}
    plain_out = generate([plain_prompts[p["id"]] for p in probs for _ in range(4)])
    rows, ctx_prompts, ctx_meta = [], [], []
    for k, p in enumerate(probs):
        attempts = plain_out[4 * k: 4 * k + 4]
        for comp, lps in attempts:
            rows.append({"group_id": p["id"], "kind": "plain", "train_prompt_ids": plain_prompts[p["id"]],
                         "completion_ids": comp, "sampling_logprobs": lps, "context_conditioned": False})
        attempt_text = tok.decode(attempts[0][0], skip_special_tokens=True)
        refl = (f"Problem: {p['question']}\nHere is an earlier attempt:\n{attempt_text}\n"
                "Check it critically, point out possible errors, then write a fresh complete solution. " + SOLVE)
        abst = f"{LESSONS}\n\nProblem: {p['question']} {SOLVE}"
        for kind, text in (("reflection", refl), ("reflection", refl), ("abstraction", abst), ("abstraction", abst)):
            ctx_prompts.append(chat_ids(tok, text))
            ctx_meta.append((p, kind))
    ctx_out = generate(ctx_prompts)
    for (p, kind), (comp, lps) in zip(ctx_meta, ctx_out):
        rows.append({"group_id": p["id"], "kind": kind, "train_prompt_ids": plain_prompts[p["id"]],
                     "completion_ids": comp, "sampling_logprobs": lps, "context_conditioned": True})
    gold = {p["id"]: p["answer"] for p in probs}
    for r in rows:
        r["reward"] = float(last_int(tok.decode(r["completion_ids"], skip_special_tokens=True)) == gold[r["group_id"]])
    rows.sort(key=lambda r: (r["group_id"], MIX.index(r["kind"])))
    data = {"problems": probs, "rollouts": rows, "gen_seconds": time.perf_counter() - t0}
    out.write_text(json.dumps(data))
    lengths = [len(r["completion_ids"]) for r in rows]
    return {"mode": "gen", "seconds": data["gen_seconds"], "mean_completion": statistics.mean(lengths),
            "reward_mean": statistics.mean(r["reward"] for r in rows), "peak_rss_gb": peak_rss_gb()}


# --------------------------------------------------------------------------------------------- workers
def bench_config(dtype: str, **grpo):
    """`auto` leaves `grpo.bf16` at the config default; `fp32` / `bf16` set it."""
    from lanpo_core.config import RunConfig

    if dtype != "auto":
        grpo = {"bf16": dtype == "bf16", **grpo}
    return RunConfig.model_validate({
        "rollout": {"num_generations": G, "batch_problems": B, "max_new_tokens": MAX_NEW},
        "grpo": {"micro_batch_size": 8, "steps": 10, **grpo}})


def precision(dtype: str) -> str:
    """What `dtype` resolves to on this machine: fp32 or bf16."""
    from lanpo_core.hardware import resolve_bf16

    return "bf16" if resolve_bf16(bench_config(dtype).grpo.bf16) else "fp32"


def worker_ours(data: dict, dtype: str, steps: int, all_sequences: bool) -> dict:
    import torch

    from lanpo_core.models import load_policy
    from lanpo_core.update import PolicyUpdater, RolloutSample

    cfg = bench_config(dtype)
    if all_sequences:
        cfg.lanpo.offpolicy.negative_advantage = "keep"
    rng = random.Random(0)
    samples = []
    for r in data["rollouts"]:
        reward = r["reward"] + (rng.random() * 0.1 if all_sequences else 0.0)
        samples.append(RolloutSample(r["group_id"], r["kind"], r["train_prompt_ids"], r["completion_ids"],
                                     r["sampling_logprobs"], reward, r["context_conditioned"]))
    model, tok = load_policy("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as run_dir:
        up = PolicyUpdater(cfg, model, tok, run_dir)
        times, cpu, metrics = [], [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            m = up.step(samples)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            metrics.append(m)
        t0 = time.perf_counter()
        info = up.save_checkpoint()
        ckpt_s = time.perf_counter() - t0
    last = metrics[-1]
    return {"mode": "ours_all" if all_sequences else "ours", "dtype": dtype, "step_s": times,
            "update_s": times, "update_cpu_s": cpu, "prepare_s": [m["time/prepare_s"] for m in metrics],
            "sequences": last["samples/trained"], "tokens": last["tokens/trained"],
            "prompt_tokens": last["tokens/prompt_trained"], "precision": precision(dtype),
            "zero_variance_groups": last["zero_variance_groups"], "dropped": last["dropped_negatives"],
            "is_n": last["is/n"], "checkpoint_s": ckpt_s, "checksum": info.checksum[:12],
            "threads": torch.get_num_threads(), "peak_rss_gb": peak_rss_gb()}


def worker_trl(data: dict, dtype: str, steps: int, own_generation: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from lanpo_core.models import load_policy
    from lanpo_core.update import build_grpo_args

    cfg = bench_config(dtype)
    gold = {p["question"]: p["answer"] for p in data["problems"]}
    by_question: dict[str, list[dict]] = {}
    for p in data["problems"]:
        by_question[p["question"]] = [r for r in data["rollouts"] if r["group_id"] == p["id"]]
    reward_of = {tuple(r["completion_ids"]): r["reward"] for r in data["rollouts"]}
    handed: dict[str, int] = {}

    def text_of(prompt) -> str:
        return prompt[-1]["content"] if isinstance(prompt, list) else prompt

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for p in prompts:
            q = text_of(p).replace(f" {SOLVE}", "")
            k = handed.get(q, 0)
            handed[q] = k + 1
            r = by_question[q][k % G]
            out["prompt_ids"].append(r["train_prompt_ids"])
            out["completion_ids"].append(r["completion_ids"])
            out["logprobs"].append(r["sampling_logprobs"])
        return out

    def reward(prompts, completions, completion_ids, **kwargs):
        if not own_generation:
            return [reward_of[tuple(c)] for c in completion_ids]
        outs = []
        for p, c in zip(prompts, completions):
            q = text_of(p).replace(f" {SOLVE}", "")
            content = c[-1]["content"] if isinstance(c, list) else c
            outs.append(float(last_int(content) == gold[q]))
        return outs

    gen_times: list[float] = []
    gen_cpu: list[float] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0, c0 = time.perf_counter(), time.process_time()
            out = super()._generate_and_score_completions(inputs)
            gen_times.append(time.perf_counter() - t0)
            gen_cpu.append(time.process_time() - c0)
            return out

    step_times: list[float] = []
    step_cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)
            step_cpu.append(time.process_time() - self.c0)

    model, tok = load_policy("smollm2-135m-instruct")
    prompts = [[{"role": "user", "content": f"{p['question']} {SOLVE}"}] for p in data["problems"]]
    with tempfile.TemporaryDirectory() as out_dir:
        args = build_grpo_args(cfg, out_dir, per_device_train_batch_size=8, gradient_accumulation_steps=G,
                               steps_per_generation=G, num_generations=G, max_steps=steps, temperature=1.0,
                               logging_strategy="steps", logging_steps=1, shuffle_dataset=False)
        trainer = Timed(model=model, reward_funcs=reward, args=args, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": prompts}),
                        rollout_func=None if own_generation else rollout_func, callbacks=[Clock()])
        trainer.train()
        logs = [h for h in trainer.state.log_history if "step_time" in h]
    update = [s - g for s, g in zip(step_times, gen_times)]
    update_cpu = [s - g for s, g in zip(step_cpu, gen_cpu)]
    return {"mode": "trl_gen" if own_generation else "trl_same", "dtype": dtype, "precision": precision(dtype),
            "step_s": step_times,
            "gen_s": gen_times, "update_s": update, "update_cpu_s": update_cpu, "sequences": B * G,
            "trl_step_time": [h["step_time"] for h in logs],
            "mean_completion": [h.get("completions/mean_length") for h in logs],
            "threads": torch.get_num_threads(), "peak_rss_gb": peak_rss_gb()}


# --------------------------------------------------------------------------------------------- driver
def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"worker {args} failed ({res.returncode})")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["process_s"] = time.perf_counter() - t0
    print(f"  {args[0]:9s} {args[2] if len(args) > 2 else '':5s} done in {out['process_s']:.0f}s", flush=True)
    return out


def med(xs):  # steady state: drop the first step when there are more
    xs = xs[1:] if len(xs) > 1 else xs
    return statistics.median(xs)


def flop_estimate(results: list[dict]) -> None:
    """Add `ideal_s` (6 x matmul params x trained tokens at the worker's `fp32_gflops`) and `over_estimate` to our
    engines' results."""
    from lanpo_core.models import resolve_policy

    n_params = matmul_params(resolve_policy("smollm2-135m-instruct").path)
    for r in results:
        if r.get("mode") in ("ours", "ours_all"):
            r["matmul_params"] = n_params
            r["ideal_s"] = 6 * n_params * (r["tokens"] + r["prompt_tokens"]) / (r["fp32_gflops"] * 1e9)
            r["over_estimate"] = med(r["update_s"]) / r["ideal_s"]
            # the least disturbed step at the faster probe: on shared cores, the closest to an idle machine
            steady = r["update_s"][1:] or r["update_s"]
            fastest = 6 * n_params * (r["tokens"] + r["prompt_tokens"]) / (max(r["fp32_gflops_probes"]) * 1e9)
            r["best_over_estimate"] = min(steady) / fastest


def summarise(results: list[dict]) -> str:
    rows = ["| dtype | engine | seqs trained | update wall s/step (each) | update CPU s/step | vs FLOP est. (best) "
            "| peak RSS GB | wall vs trl_same | CPU vs trl_same | wall vs trl_gen | CPU vs trl_gen |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in results if "dtype" in r))
    for dtype in dtypes:
        res = {r["mode"]: r for r in results if r.get("dtype") == dtype}
        base = {m: (med(res[m]["update_s"]), med(res[m]["update_cpu_s"])) for m in ("trl_same", "trl_gen")
                if m in res}
        for mode in ("ours", "ours_all", "trl_same", "trl_gen"):
            if mode not in res:
                continue
            r = res[mode]
            u, c = med(r["update_s"]), med(r["update_cpu_s"])
            each = ", ".join(f"{x:.2f}" for x in r["update_s"])
            ratios = []
            for m in ("trl_same", "trl_gen"):
                ratios += [f"{u / base[m][0]:.2f}x", f"{c / base[m][1]:.2f}x"] if m in base else ["-", "-"]
            label = dtype if dtype == r["precision"] else f"{dtype} ({r['precision']})"
            est = f"{r['over_estimate']:.2f}x ({r['best_over_estimate']:.2f}x)" if "over_estimate" in r else "-"
            rows.append(f"| {label} | {mode} | {r['sequences']:.0f} | {u:.2f} ({each}) | {c:.1f} | {est} | "
                        f"{r['peak_rss_gb']:.2f} | " + " | ".join(ratios) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (trl_gen: --gen-steps)")
    ap.add_argument("--gen-steps", type=int, default=1, help="steps for trl_gen (each one generates 64 completions)")
    ap.add_argument("--dtypes", default="auto", help="comma-separated: auto, fp32, bf16")
    ap.add_argument("--modes", default="ours,ours_all,trl_same,trl_gen")
    ap.add_argument("--out", default="/tmp/lanpo-bench-update.json")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        mode, data_path, *rest = a.worker
        if mode == "gen":
            result = worker_gen(Path(data_path))
        else:
            dtype, steps = rest[0], int(rest[1])
            data = json.loads(Path(data_path).read_text())
            if mode in ("ours", "ours_all"):
                result = worker_ours(data, dtype, steps, all_sequences=mode == "ours_all")
            else:
                result = worker_trl(data, dtype, steps, own_generation=mode == "trl_gen")
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    probes = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "rollouts.json"
        print(f"B={B} G={G} max_new_tokens={MAX_NEW}, {a.steps} steps per configuration", flush=True)
        gen = run_worker(["gen", str(data_path)])
        results = [gen]
        for dtype in a.dtypes.split(","):
            for mode in a.modes.split(","):
                steps = a.gen_steps if mode == "trl_gen" else a.steps
                ours = mode in ("ours", "ours_all")
                before = matmul_probe(os.environ.copy()) if ours else None  # the rate as loaded as the worker
                result = run_worker([mode, str(data_path), dtype, str(steps)])
                if ours:
                    probes += [before, matmul_probe(os.environ.copy())]
                    result["fp32_gflops_probes"] = [before["fp32_gflops"], probes[-1]["fp32_gflops"]]
                    result["fp32_gflops"] = statistics.mean(result["fp32_gflops_probes"])
                results.append(result)
        data = json.loads(data_path.read_text())
    flop_estimate(results)
    rates = ", ".join(f"{p['fp32_gflops']:.0f}" for p in probes)
    lengths = [len(r["completion_ids"]) for r in data["rollouts"]]
    header = (f"started {started}; rollouts: {len(lengths)} completions, mean {statistics.mean(lengths):.1f} / max "
              f"{max(lengths)} tokens, reward mean {gen['reward_mean']:.2f}; load average at end "
              f"{os.getloadavg()[0]:.1f} (2 shared cores)")
    if probes:
        header += (f"\nCPU {probes[0]['cpu']}; fp32 matmul {rates} GFLOP/s on {probes[0]['threads']} threads "
                   "(before and after each of our workers; its FLOP estimate uses the mean of its two)")
    table = summarise(results)
    print(header)
    print(table)
    Path(a.out).write_text(json.dumps({"header": header, "table": table, "matmul_probes": probes,
                                       "results": results}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
