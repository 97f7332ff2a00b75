"""The rules of one LANPO step (lanpo_core/step.py), most without a model; and `train(cfg)` against the flow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lanpo_core.config import build_config
from lanpo_core.data import Problem
from lanpo_core.feedback import FeedbackBatch, FeedbackContext
from lanpo_core.rollout import Completion
from lanpo_core.step import Rollout, plan_requests, problems_for_step, score_rollouts, training_samples


def problem(i: int, answer: str = "7") -> Problem:
    return Problem(id=f"p{i}", question=f"What is {i} + 7?", answer=answer, source="test")


def mixed_config(**extra):
    return build_config({"rollout": {"num_generations": 4},
                         "lanpo": {"rollout_mix": {"plain": 0.5, "reflection": 0.25, "abstraction": 0.25}}, **extra})


def context(pid: str, kind: str) -> FeedbackContext:
    return FeedbackContext(pid, kind, [{"role": "user", "content": f"{kind} for {pid}"}], (f"src-{pid}",), "text")


def test_groups_follow_the_mix_and_missing_contexts_fall_back_to_plain():
    cfg = mixed_config()
    feedback = FeedbackBatch({("p1", "reflection"): context("p1", "reflection"),
                              ("p2", "abstraction"): context("p2", "abstraction")})
    plan = plan_requests([problem(1), problem(2), problem(3)], feedback, cfg)
    by_problem: dict[str, Counter] = {}
    for r in plan.requests:
        by_problem.setdefault(r.tags["problem_id"], Counter())[r.tags["kind"]] += r.n
    assert by_problem["p1"] == Counter(plain=3, reflection=1)  # abstraction missing: plain instead
    assert by_problem["p2"] == Counter(plain=3, abstraction=1)
    assert by_problem["p3"] == Counter(plain=4)
    assert all(sum(c.values()) == 4 for c in by_problem.values())
    assert plan.mix == Counter(plain=10, reflection=1, abstraction=1)
    assert plan.fallbacks == Counter(reflection=2, abstraction=2)
    # plain rollouts come first in a group (rollout indices 0..), as docs/defaults.md says
    assert [r.tags["kind"] for r in plan.requests if r.tags["problem_id"] == "p1"] == ["plain", "reflection"]
    reflection = next(r for r in plan.requests if r.tags["kind"] == "reflection")
    assert reflection.messages == [{"role": "user", "content": "reflection for p1"}]
    assert reflection.tags["context_ids"] == ["src-p1"]


def test_plain_rollouts_draw_the_same_random_stream_in_lanpo_and_grpo():
    grpo = build_config({"rollout": {"num_generations": 4},
                         "lanpo": {"rollout_mix": {"plain": 1.0, "reflection": 0.0, "abstraction": 0.0}}})
    feedback = FeedbackBatch({("p2", "reflection"): context("p2", "reflection")})
    problems = [problem(1), problem(2)]
    lanpo_plan, grpo_plan = plan_requests(problems, feedback, mixed_config()), plan_requests(problems, None, grpo)
    plain = {r.tags["problem_id"]: r.stream for r in lanpo_plan.requests if r.tags["kind"] == "plain"}
    assert plain == {r.tags["problem_id"]: r.stream for r in grpo_plan.requests}
    streams = [r.stream for r in lanpo_plan.requests]
    assert len(set(streams)) == len(streams)  # every (problem, kind) its own stream


def test_a_plain_only_mix_builds_plain_requests_whatever_the_feedback():
    cfg = build_config({"rollout": {"num_generations": 4},
                        "lanpo": {"rollout_mix": {"plain": 1.0, "reflection": 0.0, "abstraction": 0.0}}})
    feedback = FeedbackBatch({("p1", "reflection"): context("p1", "reflection")})
    plan = plan_requests([problem(1)], feedback, cfg)
    assert [(r.tags["kind"], r.n) for r in plan.requests] == [("plain", 4)]
    assert plan.fallbacks == Counter()


def completion(pid: str, kind: str, text: str, finish: str = "stop") -> Completion:
    return Completion(0, 0, {"problem_id": pid, "kind": kind, "context_ids": []}, text, [1, 2], [3, 4],
                      [-0.5, -0.25], finish)


def test_scoring_numbers_rollouts_within_their_group_and_leaves_out_refused_ones():
    from lanpo_core.verify import Verifier

    cfg = mixed_config()
    completions = [completion("p1", "plain", "The answer is \\boxed{8}."),
                   completion("p1", "reflection", "", finish="refused"),
                   completion("p2", "plain", "The answer is \\boxed{5}."),
                   completion("p1", "abstraction", "The answer is \\boxed{3}.")]
    with Verifier.from_config(cfg.verify) as verifier:
        rollouts = score_rollouts(completions, [problem(1, "8"), problem(2, "9")], verifier, policy_version=3)
    assert [(r.problem_id, r.kind, r.rollout_index) for r in rollouts] == [
        ("p1", "plain", 0), ("p2", "plain", 0), ("p1", "abstraction", 1)]
    assert [r.reward for r in rollouts] == [1.0, 0.0, 0.0]
    assert {r.policy_version for r in rollouts} == {3}


def rollout(pid: str, kind: str, reward: float | None, index: int = 0) -> Rollout:
    return Rollout(pid, kind, index, [] if kind == "plain" else ["src"], "text", [9, 9, 9], [5, 6], [-0.1, -0.2],
                   "stop", 0, reward)


def test_training_samples_leave_out_unusable_groups_and_train_under_the_plain_prompt():
    cfg = mixed_config()
    rollouts = [rollout("p1", "plain", 1.0), rollout("p1", "reflection", 0.0, 1),
                rollout("p2", "plain", 1.0), rollout("p2", "plain", None, 1)]  # p2: its gold answer is unusable
    samples, unusable = training_samples(rollouts, {"p1": [1, 2], "p2": [3, 4]}, cfg)
    assert unusable == 1
    assert [(s.group_id, s.kind) for s in samples] == [("p1", "plain"), ("p1", "reflection")]
    assert [s.train_prompt_ids for s in samples] == [[1, 2], [1, 2]]  # the reflection rollout: plain prompt
    assert [s.context_conditioned for s in samples] == [False, True]
    assert samples[1].sampling_logprobs == [-0.1, -0.2]


def test_training_under_the_context_prompt_keeps_the_sampling_prompt():
    cfg = mixed_config(lanpo={"train_prompt": "context"})
    samples, _ = training_samples([rollout("p1", "reflection", 1.0)], {"p1": [1, 2]}, cfg)
    assert samples[0].train_prompt_ids == [9, 9, 9]


def test_problems_of_a_step_are_epochs_over_a_seeded_shuffle():
    problems = [problem(i) for i in range(10)]
    steps = [problems_for_step(problems, s, 5, seed=3) for s in range(4)]
    first, second = steps[0] + steps[1], steps[2] + steps[3]
    assert sorted(p.id for p in first) == sorted(p.id for p in problems)  # each problem once per epoch
    assert sorted(p.id for p in second) == sorted(p.id for p in problems)
    assert [p.id for p in first] != [p.id for p in second]  # a new order each epoch
    assert problems_for_step(problems, 1, 5, seed=3) == steps[1]  # deterministic
    assert problems_for_step(problems, 0, 5, seed=4) != steps[0]
    with pytest.raises(ValueError, match="no training problems"):
        problems_for_step([], 0, 5, seed=3)


def test_the_core_imports_neither_prefect_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys, lanpo_core.step, lanpo_core.runtime, lanpo_core.evaluate; "
            "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_core_train_without_prefect_matches_the_flow(tmp_path, tiny_model_path, monkeypatch):
    """`lanpo_core.step.train(cfg)` and the Prefect flow, on the same in-memory config: the same checkpoint
    checksum and the same pool rows."""
    from lanpo_core.config import load_config
    from lanpo_core.pool import ExperiencePool
    from lanpo_core.step import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = [f"model.name_or_path={tiny_model_path}", "grpo.steps=2", "eval.every=0", "eval.limit=2",
                 "eval.samples=1", "rollout.backend=transformers", "rollout.max_new_tokens=8",
                 "eval.max_new_tokens=8", "lanpo.abstraction.max_new_tokens=16", "lanpo.abstraction.min_similarity=0.3",
                 "grpo.learning_rate=1e-3", f"paths.runs_dir={tmp_path / 'runs'}"]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml", overrides)
    logged = []
    core = train(cfg, tmp_path / "core-run", log=lambda metrics, step: logged.append((step, metrics)))

    from flows.train import lanpo_train

    # the flow writes its checkpoints in the background: the same weights either way
    flow = lanpo_train(cfg, ["grpo.checkpoint_background=true"], run_name="flow-run")
    assert core["steps"] == flow["steps"] == 2
    assert not core["checkpoint_checksum"].startswith("base:")
    assert core["checkpoint_checksum"] == flow["checkpoint_checksum"]
    assert Path(core["checkpoint"]).is_dir()

    def rows(run_dir: Path, key: str) -> list[tuple]:
        table = ExperiencePool(run_dir / "pool", run_id=key, read_only=True).table.to_pandas()
        table = table[table["run_id"] == key]
        return sorted(tuple(r) for r in table[["step", "problem_id", "rollout_index", "kind", "response",
                                               "reward"]].itertuples(index=False))

    assert rows(tmp_path / "core-run", "core-run") == rows(Path(flow["run_dir"]), flow["run_key"])
    assert [step for step, _ in logged] == [0, 1, 2, 2]  # eval before, steps 1 and 2, eval after step 2
    assert "update/loss" in logged[1][1]
    assert "time/sync_seconds" in logged[1][1]

    # A run killed while its last checkpoint was being written: the update is cached, its checkpoint is not on
    # disk. Run again, the update runs again (the rest comes from the cache) and writes the same checkpoint.
    import shutil

    shutil.rmtree(flow["checkpoint"])
    again = lanpo_train(cfg, ["grpo.checkpoint_background=true"], run_name="flow-run")
    assert again["checkpoint_checksum"] == flow["checkpoint_checksum"]
    assert Path(again["checkpoint"]).is_dir()


def test_kind_summary_is_one_line_per_step():
    from lanpo_core.step import kind_summary

    metrics = {"update/kind/plain/trained": 6.0, "update/kind/plain/weight_mean": 1.0,
               "update/kind/plain/ess_frac": 1.0, "update/kind/plain/weight_mass": 4.25,
               "update/kind/reflection/trained": 2.0, "update/kind/reflection/weight_mean": 0.8712,
               "update/kind/reflection/ess_frac": 0.97, "update/kind/reflection/weight_mass": 1.5, "update/loss": 0.1}
    assert kind_summary(metrics) == ("plain n=6 w=1.000 ess=1.00 mass=4.25; "
                                     "reflection n=2 w=0.871 ess=0.97 mass=1.5")
