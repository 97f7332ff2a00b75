"""Mechanism check for relevant abstraction (issue #7): does information that only *related* problems carry reach a
problem's rollouts through the pool, and raise their reward, without leaking the problem's own answer?

    .venv/bin/python bench/mechanism.py [--stated 16] [--targets 32] [--g 8] [--out bench/results/mechanism.json]

The task family ("Lumen result"): "What is the Lumen result of 7 and 2?", where the Lumen result of two numbers is
their sum. *Stated* problems say so first ("The Lumen result of two numbers is their sum."); *target* problems
leave it out, so a plain rollout has to guess what a Lumen result is. The convention is one the 135M model can
apply once told (one-digit sums); conventions it cannot apply even when the problem states them were tried first
and dropped: prices in cents (2% stated vs 2% not), the number after a keyword (0.07 with the lesson vs 0.06
without), debts as negative numbers (0.01 vs 0.00). No lesson may contain a number, and the guard checks every
context against the target's gold.

Steps, with the real pipeline pieces (bundled SmolLM2-135M-Instruct through the rollout engine of
configs/tiny-cpu.yaml, the verifier, a LanceDB pool with MiniLM embeddings, `FeedbackBuilder` and its guard):
1. G plain rollouts per stated problem are scored and written to the pool (step 0), as a training step would.
2. For each target: G plain rollouts, and G abstraction rollouts whose lessons come from the pool's experiences of
   similar *other* problems (the config's threshold, top-k and duplicate rule), with two abstractors:
   `extractive` (no model: the number-free statements that recur in the retrieved problems, so the result does not
   depend on how well a 135M model summarises) and `policy` (the tiny model itself writes the lessons, as in a
   default run).
3. For each abstractor, what a training update would give those rollouts, without training: each target with
   lessons is one group (its G plain and G abstraction rollouts, the latter trained under the plain prompt), scored
   by the trainer's `PolicyUpdater.offpolicy_diagnostics` under the config's `lanpo.offpolicy` estimator: per kind
   `loss.kind_diagnostics` (docs/update.md, "Per-kind diagnostics") and log pi(y|q_plain) - log mu(y|q_sample).
The pool is only read in step 2 (a builder never writes), so both abstractors see the same pool.
Pass: abstraction-conditioned rollouts score higher than plain ones with the extractive abstractor, and the guard
drops nothing and no context holds the target's gold answer (checked again here, independently of the guard).
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
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RULE = "The Lumen result of two numbers is their sum."


def lumen_family(stated: int, targets: int, seed: int = 0):
    """(stated problems, target problems), all distinct, operands 2..9."""
    from lanpo_core.data import Problem, problem_id

    rng = random.Random(seed)
    seen: set[str] = set()

    def make(with_rule: bool) -> Problem:
        while True:
            a, b = rng.sample(range(2, 10), 2)
            question = (f"{RULE} " if with_rule else "") + f"What is the Lumen result of {a} and {b}?"
            if question not in seen:
                seen.add(question)
                label = "lumen-stated" if with_rule else "lumen-target"
                return Problem(problem_id(label, question), question, str(a + b), label, {})
    return [make(True) for _ in range(stated)], [make(False) for _ in range(targets)]


def rollouts(engine, problems, messages_for, kind: str, n: int, sampling, verifier) -> list:
    """n rollouts of `kind` per problem that has messages, scored as a training step scores them (`step.Rollout`)."""
    from lanpo_core.rollout import RolloutRequest
    from lanpo_core.step import score_rollouts

    requests = [RolloutRequest(messages=m, n=n, tags={"problem_id": p.id, "kind": kind})
                for p in problems if (m := messages_for(p)) is not None]
    return score_rollouts(engine.generate(requests, sampling), problems, verifier, policy_version=0)


def mean_reward(rows: list) -> float:
    rewards = [r.reward for r in rows if r.reward is not None]
    return statistics.fmean(rewards) if rewards else float("nan")


def update_diagnostics(updater, cfg, problems, rows: list) -> tuple[dict, dict]:
    """What an update on `rows` (one group per problem) would see at the current weights, without training
    (`PolicyUpdater.offpolicy_diagnostics`): per kind `loss.kind_diagnostics` under the config's estimator, and the
    kind's log-ratios."""
    from lanpo_core.step import plain_prompt_ids, training_samples

    samples, _ = training_samples(rows, plain_prompt_ids(problems, updater.tokenizer, cfg), cfg)
    if not samples:
        return {}, {}
    correction = cfg.lanpo.offpolicy.correction
    estimators, log_ratios = updater.offpolicy_diagnostics(samples, [correction])
    return estimators[correction], log_ratios


def run(stated: int, targets: int, g: int, seed: int, config: str,
        abstractors: tuple[str, ...] = ("extractive", "policy")) -> dict:
    from lanpo_core.config import load_config
    from lanpo_core.feedback import FeedbackBuilder, engine_abstractor, solve_messages
    from lanpo_core.rollout import SamplingSpec
    from lanpo_core.runtime import Runtime
    from lanpo_core.step import pool_records
    from lanpo_core.verify import answer_in_text

    cfg = load_config(config, [f"seed={seed}"])
    known, unknown = lumen_family(stated, targets, seed)
    sampling = SamplingSpec.from_config(cfg, seed=seed)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, closing(Runtime(cfg, Path(tmp) / "run", "mechanism")) as rt:
        # a training run's objects: the engine generates with the updater's weights, which score the rollouts
        engine, verifier, pool = rt.engine, rt.verifier, rt.pool
        started = time.perf_counter()
        seen = rollouts(engine, known, lambda p: solve_messages(p.question, cfg.prompts), "plain", g, sampling,
                        verifier)
        pool.write_step(0, pool_records(seen, known))
        plain = rollouts(engine, unknown, lambda p: solve_messages(p.question, cfg.prompts), "plain", g, sampling,
                         verifier)
        timings["pool_and_plain_seconds"] = time.perf_counter() - started

        policy_abstractor = engine_abstractor(engine, cfg, seed)  # the training step's abstractor, seeded by `seed`

        results = []
        for name in abstractors:
            started = time.perf_counter()
            lanpo = cfg.lanpo.model_copy(deep=True)
            lanpo.abstraction.abstractor = name
            builder = FeedbackBuilder(pool, lanpo, cfg.prompts, None if name == "extractive" else policy_abstractor,
                                      extraction=cfg.verify.extraction, seed=seed)
            batch = builder.abstraction(unknown, step=None)
            contexts = {p.id: batch.get(p.id, "abstraction") for p in unknown}
            # independent recheck of what the guard passed: the gold in any audited part (the lessons)
            leaks = sum(any(answer_in_text(p.answer, part) for part in c.audited)
                        for p in unknown if (c := contexts[p.id]))
            rows = rollouts(engine, unknown, lambda p: contexts[p.id].messages if contexts[p.id] else None,
                            "abstraction", g, sampling, verifier)
            with_context = {pid for pid, c in contexts.items() if c}
            plain_here = [r for r in plain if r.problem_id in with_context]
            diagnostics, log_ratios = update_diagnostics(rt.updater, cfg, unknown, plain_here + rows)
            results.append({
                "abstractor": name,
                "rollouts_per_kind": g * len(with_context),
                "reward_plain": mean_reward(plain_here),
                "reward_plain_all_targets": mean_reward(plain),
                "reward_abstraction": mean_reward(rows),
                "contexts": len(with_context),
                "targets": len(unknown),
                "guard_audited": int(batch.stats["abstraction/audited"]),
                "guard_dropped": int(batch.stats["abstraction/dropped"]),
                "gold_in_context_recheck": int(leaks),
                "no_source": int(batch.stats["abstraction/no_source"]),
                "lessons": sorted({x for c in contexts.values() if c for x in c.lessons}),
                "examples": [{"lessons": list(contexts[r.problem_id].lessons), "answer": r.text[:200],
                              "reward": r.reward} for r in rows[: 2 * g : g]],
                "kind_diagnostics": diagnostics,
                "log_ratios": log_ratios,
                "seconds": time.perf_counter() - started,
            })
    ext = results[0]
    passed = (ext["abstractor"] == "extractive" and ext["contexts"] > 0
              and ext["reward_abstraction"] > ext["reward_plain"]
              and all(r["guard_dropped"] == 0 and r["gold_in_context_recheck"] == 0 for r in results))
    policy = "".join(f"; with the tiny policy writing the lessons, {r['reward_abstraction']:.3f} against "
                     f"{r['reward_plain']:.3f} ({r['contexts']} targets with lessons)"
                     for r in results if r["abstractor"] == "policy")
    verdict = (f"**{'PASS' if passed else 'FAIL'}.** With the extractive abstractor, abstraction-conditioned "
               f"rollouts scored {ext['reward_abstraction']:.3f} against {ext['reward_plain']:.3f} for plain rollouts "
               f"of the same {ext['contexts']} target problems{policy}. "
               f"Stated problems (the convention in the text) scored {mean_reward(seen):.3f}. The guard "
               f"dropped {sum(r['guard_dropped'] for r in results)} contexts and the independent recheck found "
               f"{sum(r['gold_in_context_recheck'] for r in results)} with a target's gold answer.")
    return {
        "description": (f"A procedural family where a convention is stated only in related problems (\"{RULE}\"); "
                        f"{stated} stated problems x {g} plain rollouts fill the pool, then {targets} target problems "
                        f"without the convention get {g} plain and {g} abstraction rollouts each (real SmolLM2-135M, "
                        f"T={cfg.rollout.temperature}, threshold {cfg.lanpo.abstraction.min_similarity}, top-k "
                        f"{cfg.lanpo.abstraction.top_k}; update diagnostics under the "
                        f"`{cfg.lanpo.offpolicy.correction}` estimator)."),
        "reward_stated": mean_reward(seen), "results": results, "passed": passed, "verdict": verdict,
        "offpolicy": cfg.lanpo.offpolicy.model_dump(), "timings": timings, "config": config, "seed": seed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stated", type=int, default=16)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--abstractors", default="extractive,policy", help="extractive first (the pass criterion)")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mechanism.json"))
    args = ap.parse_args()
    result = run(args.stated, args.targets, args.g, args.seed, args.config, tuple(args.abstractors.split(",")))
    print(f"{'abstractor':<11} {'targets':>7} {'contexts':>8} {'plain':>6} {'abstr.':>6} {'dropped':>7} {'leaks':>5}")
    for r in result["results"]:
        print(f"{r['abstractor']:<11} {r['targets']:>7} {r['contexts']:>8} {r['reward_plain']:>6.3f} "
              f"{r['reward_abstraction']:>6.3f} {r['guard_dropped']:>7} {r['gold_in_context_recheck']:>5}")
        print(f"  lessons: {r['lessons'][:3]}")
    print(f"\nwhat an update ({result['offpolicy']['correction']}) would give them, one group per target with lessons:")
    print(f"{'abstractor':<11} {'kind':<12} {'trained':>7} {'w mean':>6} {'ESS/n':>6} {'w mass':>7} {'w all':>6} "
          f"{'ESS all':>7} {'log-ratio/tok':>13}")
    for r in result["results"]:
        for kind, f in r["kind_diagnostics"].items():
            print(f"{r['abstractor']:<11} {kind:<12} {f['trained']:>7.0f} {f['weight_mean']:>6.3f} "
                  f"{f['ess_frac']:>6.3f} {f['weight_mass']:>7.3f} {f['weight_mean_all']:>6.3f} "
                  f"{f['ess_frac_all']:>7.3f} {r['log_ratios'][kind]['token_mean']:>+13.4f}")
    print(result["verdict"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
