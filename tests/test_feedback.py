"""Feedback contexts and the leakage guard (lanpo_core/feedback.py), on a real pool and the real embedder."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanpo_core.config import LanpoConfig, PromptConfig, RunConfig
from lanpo_core.data import Problem, problem_id
from lanpo_core.feedback import (HIDDEN, MARKER_RE, FeedbackBatch, FeedbackBuilder, LeakageGuard,
                                 abstraction_request_messages, abstraction_solve_messages, audit_context,
                                 engine_abstractor, extractive_lessons, feedback_kinds, parse_lessons,
                                 prepare_attempt, reflection_messages, render_chat, solve_messages)
from lanpo_core.pool import ExperiencePool, LessonSet, PoolError, RolloutRecord
from lanpo_core.verify import answer_in_text, extract_answer, numeric_value

FAST = settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="session")
def embedder():
    from lanpo_core.models import load_embedder

    return load_embedder("all-minilm-l6-v2")


def prob(question: str, answer: str, source: str = "test") -> Problem:
    return Problem(problem_id(source, question), question, answer, source, {})


def attempt(p: Problem, i: int, response: str, reward: float | None, kind: str = "plain") -> RolloutRecord:
    answer, _ = extract_answer(response)
    return RolloutRecord.for_problem(p, rollout_index=i, kind=kind, response=response, reward=reward,
                                     extracted_answer=answer)


class FakeAbstractor:
    """Deterministic stand-in for the rollout engine: one fixed text per conversation, calls recorded."""

    def __init__(self, text: str):
        self.text, self.calls = text, []

    def __call__(self, conversations):
        self.calls.append(conversations)
        return [self.text for _ in conversations]


# -------------------------------------------------------------------------------------------- templates
def test_templates_are_chat_messages_with_optional_system_prompt(smollm2_path):
    plain = PromptConfig()
    with_system = PromptConfig(system_prompt="You are a careful solver.")
    m = solve_messages("What is 2 + 3?", plain)
    assert m == [{"role": "user", "content": "What is 2 + 3?\n\n" + plain.solve_instruction}]
    assert solve_messages("Q", with_system)[0] == {"role": "system", "content": "You are a careful solver."}
    msgs, context = reflection_messages("What is 2 + 3?", ["2 + 3 = [hidden]"], with_system)
    user = msgs[1]["content"]
    assert user.startswith("What is 2 + 3?")
    assert "2 + 3 = [hidden]" in user
    assert user.endswith(plain.solve_instruction)
    for phrase in ("critically", "possible errors", "fresh, complete solution"):
        assert phrase in user
    assert "What is 2 + 3?" not in context
    assert plain.solve_instruction not in context
    assert "2 + 3 = [hidden]" in context
    two, _ = reflection_messages("Q", ["a", "b"])
    assert "2 earlier attempts" in two[0]["content"]
    assert "### Earlier attempt 2" in two[0]["content"]
    request = abstraction_request_messages([("P1", "S1"), ("P2", "S" * 5000)], 3, plain, max_chars=100)[0]["content"]
    assert "at most 3" in request
    assert "do not quote any numbers" in request
    assert "S" * 101 not in request
    solve, ctx = abstraction_solve_messages("What is 2 + 3?", ["Add the ones.", "Check the sum."], plain)
    assert "- Add the ones.\n- Check the sum." in solve[0]["content"]
    assert "What is 2 + 3?" not in ctx
    for text in (user, request, solve[0]["content"]):
        assert not MARKER_RE.search(text), "the templates themselves carry no markers"
    from transformers import AutoTokenizer

    rendered = render_chat(msgs, AutoTokenizer.from_pretrained(smollm2_path))
    assert "You are a careful solver." in rendered
    assert rendered.rstrip().endswith("assistant")
    assert "<|im_start|>user" in rendered


def test_parse_lessons_keeps_short_general_bullets():
    text = ("Here are the lessons:\n1. **Translate** each sentence into an equation.\n"
            "2) Add 48 and 24 to get the total.\n- Check the result is correct before answering.\n"
            "* Keep track of units throughout.\n- Keep track of units throughout.\n- ok\n"
            "Lesson 4: Work backwards from what is asked.\n- Use \\boxed{x} for the answer.")
    lessons, stripped = parse_lessons(text, 3)
    assert lessons == ["Translate each sentence into an equation.", "Keep track of units throughout.",
                       "Work backwards from what is asked."]
    assert stripped == 4  # the digit, the marker, the too-short and the \boxed one
    assert parse_lessons("Always reread the question. Then estimate first!", 5)[0] == [
        "Always reread the question.", "Then estimate first!"]
    assert parse_lessons("", 3) == ([], 0)


# ------------------------------------------------------------------------------------------------ guard
@pytest.mark.parametrize("gold,text", [
    ("42", "- Remember that the total is 42 here."),                                  # plain, in a lesson
    ("42", "### Earlier attempt 1\nso 40 + 2 = 42, then we halve it: 21\n###"),         # plain, in an attempt
    ("0.5", "the ratio is $\\frac{1}{2}$ of the whole"),                              # LaTeX fraction
    ("3/4", "she keeps \\dfrac{3}{4} of it"),                                          # LaTeX \dfrac vs a/b
    ("7", "which gives 7.0 in total"),                                                 # 7 == 7.0
    ("1,234", "a total of 1234 coins"),                                                # thousands separator
    ("x^2+1", "the polynomial $x^2 + 1$ appears"),                                    # LaTeX expression
    ("\\pi", "- Often the area is just \\pi when the radius is one."),               # symbol, no digits
])
def test_guard_catches_a_planted_gold_answer(gold, text):
    guard = LeakageGuard()
    audit = guard.check("abstraction", text, gold, "An unrelated problem statement.")
    assert not audit.ok
    assert audit.reasons == ("gold_answer",)
    assert guard.counts["abstraction/dropped_gold_answer"] == 1


@pytest.mark.parametrize("text", ["reward: 1", "This attempt is correct.", "Incorrect!", "score = 0",
                                  "the attempt was wrong", "\u2713 done", "the ground truth says so",
                                  "the gold answer is hidden", "verified by the verifier"])
def test_guard_catches_reward_and_correctness_markers(text):
    audit = audit_context(f"### Earlier attempt 1\n{text}\n###", "99", "Q")
    assert not audit.ok
    assert audit.reasons == ("reward_marker",)


def test_guard_lets_clean_contexts_and_near_misses_through():
    assert audit_context("the sum 17 and 7.5 and 70 appear", "7", "Q").ok      # not 7 as a standalone value
    assert audit_context("x^2 + 12 is not it", "x^2+1", "Q").ok
    exempt = audit_context("0 + 7 = [hidden]", "7", "What is 0 + 7?")
    assert exempt.ok, "the problem statement already shows 7"
    assert exempt.gold_in_problem
    assert not audit_context("0 + 7 = [hidden]", "7", "What is 0 + 7?", allow_gold_in_problem=False).ok
    assert LeakageGuard(enabled=False).check("reflection", "reward: 1, answer 7", "7", "Q").ok


# -------------------------------------------------------------------------------------------- redaction
@st.composite
def answered_attempts(draw):
    """An attempt whose own final answer equals `gold`, written in one of the forms models use."""
    gold = draw(st.integers(-50, 2000))
    others = draw(st.lists(st.integers(0, 3000).filter(lambda x: x != gold), max_size=4))
    steps = " ".join(f"we get {x}, " for x in others)
    style = draw(st.sampled_from(["boxed", "hashes", "answer_is", "last", "latex", "decimal", "mixed"]))
    g = str(gold)
    final = {"boxed": f"So the answer is \\boxed{{{g}}}.", "hashes": f"\n#### {g}",
             "answer_is": f"The final answer is {g}.", "last": f"that leaves {g}",
             "latex": f"so $\\boxed{{\\frac{{{2 * gold}}}{{2}}}}$", "decimal": f"\\boxed{{{g}.0}}",
             "mixed": f"first {g} then check: {g}. Answer: \\boxed{{{g}}}"}[style]
    return str(gold), f"{steps}{final}"


@FAST
@given(answered_attempts())
def test_redaction_removes_the_attempts_own_answer(case):
    gold, text = case
    shown, changes = prepare_attempt(text)
    answer, _ = extract_answer(text)
    assert numeric_value(answer) == numeric_value(gold)
    assert changes >= 1
    assert HIDDEN in shown
    assert not answer_in_text(gold, shown), shown


# ------------------------------------------------------------------- reflection: the reward-agnostic rule
ARITHMETIC_STYLES = [
    "{a} + {b} = {v}",
    "{a} plus {b} is {v}. So the answer is \\boxed{{{v}}}.",
    "Adding {a} and {b} gives {v}.\n#### {v}",
    "{a} + {b} = {v}\n\nThe answer is \\boxed{{}}.",
    "{v}",
    "Let me count: {a}, then {b} more. Total {v}. The final answer is {v}",
]


def _arithmetic_rates(tmp_path, embedder, redact: bool) -> dict[str, float]:
    problems = [prob(f"What is {a} + {b}?", str(a + b), "arithmetic") for a in range(10) for b in range(10)]
    pool = ExperiencePool(tmp_path / ("pool-redact" if redact else "pool-raw"), "correct", embedder=embedder)
    wrong_pool = ExperiencePool(pool.uri, "wrong", embedder=embedder)
    for target, offset in ((pool, 0), (wrong_pool, 1)):
        recs = []
        for p in problems:
            a, b = map(int, re.findall(r"\d+", p.question))
            for i, style in enumerate(ARITHMETIC_STYLES):
                v = a + b + (offset if (i + a) % 2 else -offset if a + b > 0 else offset)
                recs.append(attempt(p, i, style.format(a=a, b=b, v=v), 1.0 if offset == 0 else 0.0))
        target.write_step(0, recs)
    lanpo = LanpoConfig()
    lanpo.reflection.max_attempts = 1
    lanpo.reflection.redact_answers = redact
    rates = {}
    for name, target in (("correct", pool), ("wrong", wrong_pool)):
        dropped = total = 0
        for seed in range(len(ARITHMETIC_STYLES)):  # random selection reaches every style
            lanpo.reflection.selection = "random"
            batch = FeedbackBuilder(target, lanpo, seed=seed).reflection(problems, step=1)
            dropped += batch.stats["reflection/dropped"]
            total += batch.stats["reflection/audited"]
        rates[name] = dropped / total
    return rates


def test_drop_rate_does_not_depend_on_the_attempts_correctness(tmp_path, embedder):
    rates = _arithmetic_rates(tmp_path, embedder, redact=True)
    assert rates["correct"] == rates["wrong"] == 0.0
    raw = _arithmetic_rates(tmp_path, embedder, redact=False)
    # without redaction the guard itself would leak correctness
    assert raw["correct"] > 0.7
    assert raw["wrong"] < 0.05


@st.composite
def attempt_sets(draw):
    gold = draw(st.integers(10, 999))
    a = draw(st.integers(1, 9))
    question = f"A shop sells {a} boxes a day for a while. How many boxes does it sell in all?"
    pieces = st.sampled_from(["we add", "so", "correct", "wrong", "reward", "\u2713", "check", "then", "Answer:",
                              "\\boxed{%d}" % gold, str(gold), str(gold + 1), "#### %d" % gold, "the answer is"])
    texts = draw(st.lists(st.lists(st.one_of(pieces, st.integers(0, 999).map(str)), min_size=1, max_size=8)
                          .map(" ".join), min_size=1, max_size=6))
    rewards = draw(st.lists(st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0, 1)),
                            min_size=len(texts), max_size=len(texts)))
    return prob(question, str(gold)), texts, rewards


_ENCODED: dict = {}


@FAST
@given(case=attempt_sets(), n=st.integers(1, 3), selection=st.sampled_from(["most_recent", "random"]),
       data=st.data())
def test_reflection_contexts_never_leak_and_ignore_rewards(tmp_path_factory, embedder, case, n, selection, data):
    p, texts, rewards = case
    permuted = data.draw(st.permutations(rewards))
    folder = tmp_path_factory.mktemp("pool")
    lanpo = LanpoConfig()
    lanpo.reflection.max_attempts, lanpo.reflection.selection = n, selection
    contexts = []
    if p.question not in _ENCODED:  # embedded once for all examples
        _ENCODED[p.question] = embedder.encode([p.question], normalize_embeddings=True)[0]
    for run, rs in (("a", rewards), ("b", permuted)):
        pool = ExperiencePool(folder, run, embedder=embedder)
        pool.remember_embeddings({p.id: _ENCODED[p.question]})
        pool.write_step(0, [attempt(p, i, t, r) for i, (t, r) in enumerate(zip(texts, rs))])
        batch = FeedbackBuilder(pool, lanpo).reflection([p], step=1)
        ctx = batch.get(p.id, "reflection")
        assert batch.stats["reflection/built"] + batch.stats["reflection/dropped"] == 1
        if ctx is not None:
            assert not MARKER_RE.search(ctx.context_text)
            assert not answer_in_text(p.answer, ctx.context_text)
            assert len(ctx.audited) == min(n, len(texts))
            assert all(part in ctx.context_text for part in ctx.audited)
            contexts.append((ctx.messages, [u.split("/", 1)[1] for u in ctx.source_ids]))
        else:
            contexts.append(None)
    assert contexts[0] == contexts[1], "permuting the stored rewards changed the context"


def test_reflection_guard_drops_a_wrong_attempt_that_states_the_gold(tmp_path, embedder):
    p = prob("Sam has 12 pens and buys 3 packs of 5. How many pens now?", "27")
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, "3 * 5 = 15, 12 + 15 = 27. Then minus 2: \\boxed{25}", 0.0)])
    builder = FeedbackBuilder(pool)
    batch = builder.build([p], step=1, kinds=["reflection"])
    assert batch.get(p.id, "reflection") is None
    assert batch.stats["reflection/dropped_gold_answer"] == 1
    assert builder.guard.counts["reflection/dropped"] == 1
    assert batch.metrics()["feedback/reflection/dropped"] == 1.0
    pool.write_step(1, [attempt(p, 0, "3 * 5 = 15, 12 + 15 = 27. \\boxed{27}", 1.0)])
    ok = builder.build([p], step=2, kinds=["reflection"]).get(p.id, "reflection")
    assert ok is not None
    assert "27" not in ok.messages[-1]["content"]
    assert ok.source_ids == (f"run1/1/{p.id}/0",)


# The template's own headings ("### Earlier attempt 1", "Below are 2 earlier attempts") are not the model's: a gold
# answer of 1 or 2 must not make every reflection context fail, while everything the attempts say is still audited.
@pytest.mark.parametrize("question, gold, responses, kept", [
    ("What is 5 - 4?", "1", ["5 - 4 = 3, so \\boxed{3}"], True),
    ("What is 9 - 8?", "1", ["9 - 8 = 2"], True),
    ("What is 9 - 7?", "2", ["9 - 7 = 3", "The answer is 4."], True),
    ("What is 8 - 7?", "1", ["8 - 7 = 0", "So it is 3."], True),
    ("What is 5 - 4?", "1", ["5 - 4 = 1, then add 1 more: \\boxed{2}"], False),   # the gold mid-text
    ("What is 9 - 7?", "2", ["9 - 7 = 3", "First 9 - 7 = 2, then double: 4"], False),
])
def test_reflection_guard_audits_the_attempts_not_the_template(tmp_path, embedder, question, gold, responses, kept):
    p = prob(question, gold, "arithmetic")
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, i, r, 0.0) for i, r in enumerate(responses)])
    lanpo = LanpoConfig()
    lanpo.reflection.max_attempts = len(responses)
    builder = FeedbackBuilder(pool, lanpo)
    batch = builder.reflection([p], step=1)
    ctx = batch.get(p.id, "reflection")
    assert (ctx is not None) is kept
    assert batch.stats["reflection/dropped_gold_answer"] == builder.guard.counts["reflection/dropped_gold_answer"] \
        == (0 if kept else 1)
    if kept:
        assert f"### Earlier attempt {len(responses)}" in ctx.messages[-1]["content"]
        assert len(ctx.audited) == len(responses)
        assert not any(answer_in_text(gold, part) for part in ctx.audited)
        assert all(part in ctx.messages[-1]["content"] for part in ctx.audited), "the audit covers what is shown"


def test_guard_audits_every_model_written_part():
    guard = LeakageGuard()
    lessons = ["Use the area formula for a circle.", "For a unit radius the area is \\pi."]
    assert guard.check("abstraction", lessons, "\\pi", "A circle has radius one. What is its area?").reasons == (
        "gold_answer",)
    assert guard.check("reflection", ["2 + 3 = [hidden]", "so 1 is left"], "1", "Q").reasons == ("gold_answer",)
    assert guard.check("reflection", ["2 + 3 = [hidden]", "the reward was high"], "8", "Q").reasons == (
        "reward_marker",)
    assert guard.check("reflection", ["2 + 3 = [hidden]", "no clue"], "1", "Q").ok
    assert guard.counts["abstraction/dropped_gold_answer"] == guard.counts["reflection/dropped_gold_answer"] == 1
    assert guard.counts["reflection/audited"] == 3
    # the exemption: the problem statement shows the gold anyway
    assert guard.check("reflection", ["so 1 is left"], "1", "What is 1 + 0?").ok


# ----------------------------------------------------------------------------------------- abstraction
@pytest.fixture()
def abstraction_setup(tmp_path, embedder, shared_data):
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]]
    problems = [prob(r["question"], r["answer"].split("####")[-1].strip(), "gsm8k") for r in rows]
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, i, f"Solution {i}: " + rows[k]["answer"], 1.0 if i == 0 else 0.0)
                        for k, p in enumerate(problems) for i in range(2)])
    return pool, problems


LESSONS_TEXT = ("- Write each quantity as an expression first.\n- Multiply 12 by 4.\n"
                "- Check that the units match.\n- Work backwards from the question.\n- Another one here.")


def test_abstraction_builds_lessons_into_the_batch_not_the_pool(abstraction_setup):
    pool, problems = abstraction_setup
    fake = FakeAbstractor(LESSONS_TEXT)
    lanpo = LanpoConfig()
    lanpo.abstraction.min_similarity = 0.5
    version = pool.version
    builder = FeedbackBuilder(pool, lanpo, abstractor=fake, abstractor_name="fake")
    targets = problems[:8]
    batch = builder.build(targets, step=1, kinds=["abstraction"], policy_version=3)
    built = [batch.get(p.id, "abstraction") for p in targets]
    assert batch.stats["abstraction/built"] == sum(c is not None for c in built) >= 4
    assert len(fake.calls) == 1
    assert batch.stats["abstraction/abstractor_calls"] == len(fake.calls[0])
    ctx = next(c for c in built if c is not None)
    assert ctx.lessons == ("Write each quantity as an expression first.", "Check that the units match.",
                           "Work backwards from the question.")
    assert ctx.problem_id not in {u.split("/")[2] for u in ctx.source_ids}
    assert len(ctx.source_ids) <= 4
    request = fake.calls[0][0][-1]["content"]
    assert "do not quote any numbers" in request
    assert "Solution 0: " in request
    assert "Solution 1: " not in request
    sets = batch.lesson_sets()
    assert len(sets) == batch.stats["abstraction/lessons_generated"] == len(fake.calls[0])
    made = next(s for s in sets if set(s.source_ids) == set(ctx.source_ids))
    assert made.lessons == ctx.lessons
    assert (made.step, made.producer, made.policy_version) == (1, "fake", 3)
    assert made.problem_id in {p.id for p in targets}
    assert pool.version == version, "building feedback never writes the pool"
    assert pool.get_lessons(ctx.source_ids) is None


def _abstraction_at_step_1(abstraction_setup, abstractor):
    """(pool, lanpo config, the 8 target problems, their step-1 abstraction batch)."""
    pool, problems = abstraction_setup
    lanpo = LanpoConfig()
    lanpo.abstraction.min_similarity = 0.5
    targets = problems[:8]
    batch = FeedbackBuilder(pool, lanpo, abstractor=abstractor).build(targets, step=1, kinds=["abstraction"])
    return pool, lanpo, targets, batch


def test_lesson_sets_written_with_the_step_are_found_by_a_new_pool(abstraction_setup, embedder):
    pool, _, targets, batch = _abstraction_at_step_1(abstraction_setup, FakeAbstractor(LESSONS_TEXT))
    contexts = [c for c in batch.contexts.values() if c.kind == "abstraction"]
    assert contexts
    before = pool.version
    step_rollouts = [attempt(p, 0, "Solution again.", 0.0, kind="abstraction") for p in targets]
    report = pool.write_step(1, step_rollouts, lessons=batch.lesson_sets())
    assert report.lessons_written == len(batch.lesson_sets())
    assert report.data_version == before + 1, "rollouts and lessons are one append"
    reopened = ExperiencePool(pool.uri, "run1", embedder=embedder)
    for ctx in contexts:
        assert reopened.get_lessons(ctx.source_ids) == list(ctx.lessons)
    step_view, previous = reopened.open_at(report.data_version), reopened.open_at(before)
    assert step_view.count(step=1) == len(targets)
    assert step_view.count(kind="lesson") == len(batch.lesson_sets())
    assert previous.count(step=1) == 0
    assert previous.count(kind="lesson") == 0
    # the same step written again (a resumed run, the batch from the cache) adds no row and no version
    again = reopened.write_step(1, step_rollouts, lessons=batch.lesson_sets())
    assert (again.written, again.lessons_written) == (0, 0)
    assert again.version == reopened.version == report.version
    assert reopened.table.count_rows() == pool.table.count_rows()


def test_builder_reuses_stored_lessons_without_asking_the_abstractor(abstraction_setup, embedder):
    pool, lanpo, targets, first = _abstraction_at_step_1(abstraction_setup, FakeAbstractor(LESSONS_TEXT))
    pool.write_step(1, [], lessons=first.lesson_sets())
    reopened = ExperiencePool(pool.uri, "run1", embedder=embedder)
    fresh = FakeAbstractor("- unused")
    again = FeedbackBuilder(reopened, lanpo, abstractor=fresh).build(targets, step=1, kinds=["abstraction"])
    assert fresh.calls == []
    assert again.lesson_sets() == [], "nothing new to store"
    assert again.stats["abstraction/lessons_cached"] == first.stats["abstraction/built"]
    assert {k: c.lessons for k, c in again.contexts.items()} == {k: c.lessons for k, c in first.contexts.items()}


def test_problems_with_the_same_sources_share_one_request(tmp_path, embedder):
    family = [lumen(item, d, True) for item, d in (("pen", 3), ("lamp", 7), ("hat", 2), ("drum", 9))]
    targets = [lumen("kite", 6, False), lumen("bell", 6, False)]
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, f"That is {p.answer} cents.", 1.0) for p in family])
    lanpo = LanpoConfig()
    lanpo.abstraction.min_similarity = 0.5
    fake = FakeAbstractor("- Convert every price to the unit the question uses.")
    batch = FeedbackBuilder(pool, lanpo, abstractor=fake).abstraction(targets, 1)
    kite, bell = (batch.get(p.id, "abstraction") for p in targets)
    assert set(kite.source_ids) == set(bell.source_ids)
    assert [len(c) for c in fake.calls] == [1]
    assert kite.lessons == bell.lessons == ("Convert every price to the unit the question uses.",)
    assert [s.problem_id for s in batch.lesson_sets()] == [targets[0].id], "made for the first problem asking"


def test_abstraction_guard_drops_lessons_with_the_gold(tmp_path, embedder):
    circles = [prob(f"A circle has radius {w}. What is its area in terms of pi?", f"{k}\\pi", "geo")
               for k, w in ((4, "two"), (9, "three"), (16, "four"), (25, "five"))]
    target = prob("A circle has radius one. What is its area in terms of pi?", "\\pi", "geo")
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, "Area is pi r^2.", 1.0) for p in circles])
    lanpo = LanpoConfig()
    lanpo.abstraction.min_similarity, lanpo.abstraction.duplicate_similarity = 0.5, 0.999  # the guard is under test
    leaky = FakeAbstractor("- Use the area formula for a circle.\n- For a unit radius the area is \\pi.")
    batch = FeedbackBuilder(pool, lanpo, abstractor=leaky).build([target], step=1, kinds=["abstraction"])
    assert batch.get(target.id, "abstraction") is None
    assert batch.stats["abstraction/dropped_gold_answer"] == 1
    assert batch.stats["abstraction/built"] == 0
    # the lessons are still handed over for storage, as before: general lessons may serve other problems
    assert [s.lessons for s in batch.lesson_sets()] == [
        ("Use the area formula for a circle.", "For a unit radius the area is \\pi.")]


def test_abstraction_without_sources_or_abstractor_falls_back(abstraction_setup):
    pool, problems = abstraction_setup
    lanpo = LanpoConfig()
    lanpo.abstraction.min_similarity = 0.99
    assert FeedbackBuilder(pool, lanpo).abstraction(problems[:3], 1).stats["abstraction/no_source"] == 3
    lanpo.abstraction.min_similarity = 0.3
    none = FeedbackBuilder(pool, lanpo).abstraction(problems[:3], 1)
    assert none.stats["abstraction/no_abstractor"] == 3
    assert not none.contexts

    def broken(conversations):
        raise RuntimeError("engine down")

    failed = FeedbackBuilder(pool, lanpo, abstractor=broken).abstraction(problems[:3], 1)
    assert failed.stats["abstraction/abstractor_errors"] == 3
    assert not failed.contexts
    with pytest.raises(ValueError, match="returned 0 texts"):
        FeedbackBuilder(pool, lanpo, abstractor=lambda c: []).abstraction(problems[:3], 1)
    empty = FeedbackBuilder(pool, lanpo, abstractor=FakeAbstractor("1. Add 2 and 3.")).abstraction(problems[:3], 1)
    assert empty.stats["abstraction/no_lessons"] == 3
    assert empty.stats["abstraction/lessons_stripped"] == 3
    assert empty.lesson_sets() == [], "a set with no usable lesson is not kept: it is asked again next time"


def test_extractive_lessons_keep_recurring_number_free_statements():
    texts = ["At the Lumen market, prices are in cents. A pen costs 3 dollars. What is its price?",
             "A cup costs 5 dollars.  At the Lumen market, prices are in cents. What does it cost there?",
             "At the Lumen market, prices are in cents. Bring a bag. A hat costs 2 dollars.",
             "Bring a bag. What does it cost there? A hat costs 2 dollars."]
    assert extractive_lessons(texts, 3) == ["At the Lumen market, prices are in cents.", "Bring a bag."]
    assert extractive_lessons(texts, 1) == ["At the Lumen market, prices are in cents."]
    assert extractive_lessons(texts[:1], 3) == []
    assert extractive_lessons(texts, 3, known="Bring a bag. What now?") == ["At the Lumen market, prices are in cents."]


def lumen(item: str, dollars: int, stated: bool) -> Problem:
    rule = "At the Lumen market, prices are written in cents. " if stated else "At the Lumen market, "
    return prob(f"{rule}{'A' if stated else 'a'} {item} costs {dollars} dollars. What is the price of the {item}?",
                str(100 * dollars), "lumen")


def test_extractive_abstractor_and_read_only_builder(tmp_path, embedder):
    family = [lumen(item, d, True) for item, d in (("pen", 3), ("lamp", 7), ("hat", 2), ("drum", 9))]
    target = lumen("kite", 6, False)
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, f"That is {p.answer} cents.", 1.0) for p in family])
    lanpo = LanpoConfig()
    lanpo.abstraction.abstractor = "extractive"
    lanpo.abstraction.min_similarity = 0.5  # MiniLM puts these at 0.52-0.62: the item names weigh a lot
    # evaluation reads the pool (step None): the lessons are used, and the builder writes nothing
    version = pool.version
    read_only = FeedbackBuilder(pool, lanpo).abstraction([target], None)
    ctx = read_only.get(target.id, "abstraction")
    assert ctx is not None
    assert ctx.lessons == ("At the Lumen market, prices are written in cents.",)
    assert len(ctx.source_ids) == 4
    assert pool.get_lessons(ctx.source_ids) is None
    assert pool.version == version
    assert read_only.stats["abstraction/audited"] == 1
    assert read_only.stats["abstraction/dropped"] == 0
    assert [s.step for s in read_only.lesson_sets()] == [None]
    with pytest.raises(PoolError, match="step is None"):
        pool.write_step(1, [], lessons=read_only.lesson_sets())
    # training stores them with the step, keyed by their sources, like any abstractor's
    stored = FeedbackBuilder(pool, lanpo).abstraction([target], 1)
    assert stored.get(target.id, "abstraction").lessons == ctx.lessons
    assert [s.producer for s in stored.lesson_sets()] == ["extractive"]
    pool.write_step(1, [], lessons=stored.lesson_sets())
    assert pool.get_lessons(ctx.source_ids) == list(ctx.lessons)


def test_a_test_problem_never_retrieves_itself_from_the_training_pool(tmp_path, embedder):
    from dataclasses import replace

    family = [lumen(item, d, True) for item, d in (("pen", 3), ("lamp", 7), ("hat", 2), ("drum", 9))]
    family.append(lumen("kite", 6, False))
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, f"That is {p.answer} cents.", 1.0) for p in family])
    lanpo = LanpoConfig()
    lanpo.abstraction.abstractor = "extractive"
    lanpo.abstraction.min_similarity = 0.5
    # the kite problem is also a test problem (same text, evaluation id): its own rollouts must not be shown
    test = replace(family[-1], id=f"eval/lumen/{family[-1].id}")
    builder = FeedbackBuilder(pool, lanpo)
    ctx = builder.abstraction([test], None).get(test.id, "abstraction")
    assert ctx is not None
    assert len(ctx.source_ids) == 4
    assert not any(family[-1].id in uid for uid in ctx.source_ids)
    assert ctx.lessons == ("At the Lumen market, prices are written in cents.",)


# ------------------------------------------------------------------------------- batches and abstractors
def test_batches_merge_lesson_sets_first_come_and_stay_plain_data():
    import pickle

    a, b = FeedbackBatch(), FeedbackBatch()
    first = LessonSet(("u1", "u2"), ("Check the units.",), 2, "p1", "Q1", "policy", 1)
    a.new_lessons[first.key] = first
    b.new_lessons[first.key] = LessonSet(("u2", "u1"), ("Other.",), 2, "p2", "Q2")
    b.new_lessons["k2"] = LessonSet(("u3",), ("Draw a picture.",), 2, "p3", "Q3")
    a.update(b)
    assert [s.problem_id for s in a.lesson_sets()] == ["p1", "p3"]
    assert pickle.loads(pickle.dumps(a)).lesson_sets() == a.lesson_sets()


class RecordingEngine:
    """Stands in for a rollout engine (a model here would only slow the test): records what it is asked."""

    def __init__(self):
        self.calls = []

    def generate(self, requests, sampling):
        from types import SimpleNamespace

        self.calls.append((requests, sampling))
        return [SimpleNamespace(text=f"- lesson {i}", completion_ids=[1] * (i + 2), prompt_ids=[7] * 10)
                for i in range(len(requests))]


def test_engine_abstractor_asks_greedily_once_per_conversation():
    cfg = RunConfig()
    cfg.lanpo.abstraction.max_new_tokens = 77
    engine = RecordingEngine()
    abstractor = engine_abstractor(engine, cfg, step=5)
    conversations = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    assert abstractor(conversations) == ["- lesson 0", "- lesson 1"]
    assert abstractor(conversations[:1]) == ["- lesson 0"]
    requests, sampling = engine.calls[0]
    assert [r.messages for r in requests] == conversations
    assert [r.n for r in requests] == [1, 1]
    assert (sampling.temperature, sampling.seed, sampling.max_new_tokens) == (0.0, 5, 77)
    assert (sampling.top_p, sampling.top_k) == (cfg.rollout.top_p, cfg.rollout.top_k)
    assert abstractor.tokens == 2 + 3 + 2, "a running count over calls"
    assert abstractor.prompt_tokens == 3 * 10, "what it read counts too"


@pytest.mark.parametrize("mix,group,kinds", [
    ({"plain": 1.0, "reflection": 0.0, "abstraction": 0.0}, 8, []),
    ({"plain": 0.5, "reflection": 0.25, "abstraction": 0.25}, 8, ["reflection", "abstraction"]),
    ({"plain": 0.5, "reflection": 0.0, "abstraction": 0.5}, 4, ["abstraction"]),
    ({"plain": 0.9, "reflection": 0.0, "abstraction": 0.1}, 4, []),  # 0.4 of a rollout rounds to none
])
def test_feedback_kinds_are_the_kinds_the_mix_gives_rollouts(mix, group, kinds):
    cfg = RunConfig()
    cfg.lanpo.rollout_mix = type(cfg.lanpo.rollout_mix)(**mix)
    cfg.rollout.num_generations = group
    assert feedback_kinds(cfg) == kinds


# ------------------------------------------------------------------------- failure-mode controls (issue 13)
def test_leak_correctness_control_shows_the_verdict_and_the_answer(tmp_path, embedder):
    p = prob("What is 7 + 5?", "12")
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(p, 0, "7 + 5 = 12", 1.0), attempt(p, 1, "7 + 5 = 13", 0.0)])
    method = FeedbackBuilder(pool, LanpoConfig(reflection={"max_attempts": 2})).build([p], 1, ["reflection"])
    assert "12" not in method.get(p.id, "reflection").messages[-1]["content"]       # the method hides it
    assert "verifier" not in method.get(p.id, "reflection").messages[-1]["content"]
    control = LanpoConfig(reflection={"max_attempts": 2}, failure_control="leak_correctness")
    batch = FeedbackBuilder(pool, control).build([p], 1, ["reflection"])
    text = batch.get(p.id, "reflection").messages[-1]["content"]
    assert "7 + 5 = 12\nThe verifier judged this attempt correct." in text
    assert "7 + 5 = 13\nThe verifier judged this attempt incorrect." in text
    assert "hidden" not in text
    # the guard only counts: it would have dropped this context (the gold and a correctness marker)
    assert batch.stats["reflection/audited"] == 1 and batch.stats["reflection/would_drop"] == 1
    assert batch.stats["reflection/dropped"] == 0 and batch.stats["reflection/built"] == 1


def test_raw_experiences_control_shows_other_problems_without_threshold(tmp_path, embedder):
    target = prob("What is 9 × 3?", "27")
    others = [prob("What is 4 + 2?", "6"), prob("Sam has 12 pens and buys 3 more. How many pens now?", "15")]
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, [attempt(o, 0, f"It is {o.answer}.", 1.0) for o in others])
    abstractor = FakeAbstractor("- Check each step.")
    control = LanpoConfig(failure_control="raw_experiences")
    batch = FeedbackBuilder(pool, control, abstractor=abstractor).build([target], 1, ["abstraction"])
    ctx = batch.get(target.id, "abstraction")
    text = ctx.messages[-1]["content"]
    assert abstractor.calls == []                               # no abstraction
    assert len(ctx.source_ids) == 2                             # the pen problem is far below the 0.6 threshold
    assert "It is 15." in text and "Sam has 12 pens" in text and text.startswith("What is 9 × 3?")
    assert ctx.lessons == () and batch.stats["abstraction/built"] == 1
    assert batch.stats["abstraction/would_drop"] == 0 and batch.stats["abstraction/dropped"] == 0
    # the method's own path keeps the threshold: only the sum is near enough to be a source, or none at all
    method = FeedbackBuilder(pool, LanpoConfig(), abstractor=abstractor).build([target], 1, ["abstraction"])
    got = method.get(target.id, "abstraction")
    assert got is None or len(got.source_ids) < 2


def test_a_failure_control_needs_the_rollouts_it_breaks():
    with pytest.raises(ValueError, match="rollout_mix.reflection is 0"):
        LanpoConfig(failure_control="leak_correctness", rollout_mix={"plain": 0.75, "reflection": 0,
                                                                    "abstraction": 0.25})
    assert LanpoConfig().failure_control == "off"
