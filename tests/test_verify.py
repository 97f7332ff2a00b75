"""Answer extraction, every verifier status, the hard time limit, and agreement on real reference solutions."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanpo_core.verify import (Verifier, answer_in_text, extract_answer, gsm8k_gold, last_boxed, normalize_answer,
                               summarize)


@pytest.fixture(scope="module")
def verifier():
    with Verifier() as v:
        yield v


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{7}.", "7"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\{1, \\{2\\}\\}} end", "\\{1, \\{2\\}\\}"),
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed 5 apples", "5"),
    ("unclosed \\boxed{3", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, extraction, expected", [
    ("3 + 4 = 7\n#### 7", ["boxed", "hashes"], ("7", "hashes")),
    ("We get 12. The final answer is: $\\frac{3}{4}$.", ["answer_is"], ("\\frac{3}{4}", "answer_is")),
    ("The answer is \\boxed{9} indeed", ["answer_is"], ("9", "answer_is")),
    ("I think 3, no, 1,234.5 total", ["last_number"], ("1,234.5", "last_number")),
    ("ratio 3 / 4", ["last_number"], ("3/4", "last_number")),
    ("\\boxed{2} and 5", ["last_number", "boxed"], ("5", "last_number")),
    ("\\boxed{2} and 5", ["boxed", "last_number"], ("2", "boxed")),
    ("no digits at all", list(("boxed", "hashes", "answer_is", "last_number")), (None, None)),
    ("", ["boxed"], (None, None)),
])
def test_extract_answer_order(text, extraction, expected):
    assert extract_answer(text, extraction) == expected


# (text, answer under the default extractors): trailing punctuation never sticks to the answer, thousands separators
# inside a number do, and "the answer is" stops at the answer instead of taking the rest of the line.
@pytest.mark.parametrize("text, expected", [
    ("So 5 + 4 = 9, which is odd", ("9", "last_number")),
    ("9, I think", ("9", "last_number")),
    ("Total 1,234, done", ("1,234", "last_number")),
    ("The answer is 9, because 5 + 4 = 9.", ("9", "answer_is")),
    ("The final answer is 3 dollars", ("3", "answer_is")),
    ("The answer is 1,234, in total", ("1,234", "answer_is")),
    ("The answer is $12.50 per hour", ("12.50", "answer_is")),
    ("The answer is $\\frac{1}{2}$ of the cake.", ("\\frac{1}{2}", "answer_is")),
    ("The answer is \\frac{1}{2}.", ("\\frac{1}{2}", "answer_is")),
    ("The answer is x^2 + 1 for every x.", ("x^2 + 1", "answer_is")),
    ("The answer is (1, 2] here", ("(1, 2]", "answer_is")),
    ("The answer is 2\\sqrt{3}, since", ("2\\sqrt{3}", "answer_is")),
    ("The answer is (B).", ("(B)", "answer_is")),
    ("The answer is Evelyn.", ("Evelyn", "answer_is")),  # no math at all: the word, as before
    ("so it is 3.5.", ("3.5", "last_number")),
    ("it ends at -2, then stops", ("-2", "last_number")),
    ("half of it: \\frac{1}{2}.", ("\\frac{1}{2}", "last_number")),
    ("she earns $12.50 per hour", ("12.50", "last_number")),
    ("so 1,2,3 and done", ("3", "last_number")),
    ("3 + 4 = 7\n#### 7.", ("7", "hashes")),
])
def test_extraction_stops_at_the_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("response, gold", [
    ("So 5 + 4 = 9, which is odd", "9"),
    ("9, I think", "9"),
    ("Total 1,234, done", "1234"),
    ("The answer is 9, because 5 + 4 = 9.", "9"),
    ("The final answer is 3 dollars", "3"),
    ("The answer is -2, since 3 - 5 = -2", "-2"),
    ("so it is 3.5.", "3.5"),
    ("half of it: \\frac{1}{2}.", "0.5"),
])
def test_answers_followed_by_punctuation_or_words_score_correct(verifier, response, gold):
    assert verifier.score(response, gold).status == "correct"


def test_unknown_extractor_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        Verifier(["boxed", "magic"])
    with pytest.raises(ValueError, match="timeout_seconds"):
        Verifier(timeout_seconds=0)


@pytest.mark.parametrize("response, gold, status, reward", [
    ("\\boxed{7}", "7", "correct", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct", 1.0),
    ("\\boxed{\\dfrac{2}{4}}", "0.5", "correct", 1.0),
    ("\\boxed{27}", "27.0", "correct", 1.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", "correct", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", "correct", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", "correct", 1.0),
    ("#### 1,234", "1234", "correct", 1.0),
    ("\\boxed{8}", "7", "wrong", 0.0),
    ("\\boxed{[1, 2]}", "(1,2]", "wrong", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", "wrong", 0.0),
    ("\\boxed{@@}", "7", "wrong", 0.0),
    ("I cannot solve this", "7", "no_answer", 0.0),
    ("", "7", "no_answer", 0.0),
    ("\\boxed{7}", "", "gold_unparsable", None),
    ("\\boxed{7}", "@@@", "gold_unparsable", None),
    ("I cannot solve this", "@@@", "gold_unparsable", None),  # an unusable gold is skipped, whatever the response
    ("", "@@@", "gold_unparsable", None),
])
def test_statuses(verifier, response, gold, status, reward):
    score = verifier.score(response, gold)
    assert (score.status, score.reward) == (status, reward)


def test_an_unusable_gold_never_gives_a_reward(verifier):
    """A group whose gold answer cannot be parsed is left out of the update: every response, answered or not, is a
    skip; the same responses against a usable gold keep their rewards."""
    responses = ["\\boxed{@@@}", "@@@", "I cannot solve this", "", "The answer is 7.", "\\boxed{}"]
    for gold in ("@@@", "\\boxed{}", "  "):
        scores = verifier.score_batch((r, gold) for r in responses)
        assert [(s.reward, s.status) for s in scores] == [(None, "gold_unparsable")] * len(responses), gold
    mixed = verifier.score_batch([("I cannot solve this", "@@@"), ("I cannot solve this", "7"), ("7", "7")])
    assert [(s.reward, s.status) for s in mixed] == [(None, "gold_unparsable"), (0.0, "no_answer"), (1.0, "correct")]


def test_format_reward_only_for_boxed():
    with Verifier(format_reward=0.1) as v:
        boxed, plain, wrong = v.score_batch([("\\boxed{7}", "7"), ("it is 7", "7"), ("\\boxed{8}", "7")])
    assert (boxed.reward, plain.reward, wrong.reward) == (1.1, 1.0, 0.1)


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def test_timeout_really_stops_runaway_parsing_and_leaves_nothing_behind():
    before = _children(os.getpid())
    with Verifier(timeout_seconds=1) as v:
        v.score("\\boxed{1}", "1")  # start the child outside the timed part
        first_child = v.child_pid
        started = time.monotonic()
        scores = v.score_batch([("\\boxed{3}", "3"), ("\\boxed{9^{9^{9^{9^{9}}}}}", "3"),
                                ("\\boxed{(10^{10^{10}})!}", "3"), ("\\boxed{4}", "4")])
        elapsed = time.monotonic() - started
        assert [s.status for s in scores] == ["correct", "timeout", "timeout", "correct"]
        assert v.timeouts == 2
        assert first_child not in _children(os.getpid())  # the stuck child was killed, a fresh one serves
        # Two 1 s limits plus two child restarts (~1 s each), not the minutes the parses would take.
        assert elapsed < 12
    assert _children(os.getpid()) == before


def test_verifier_works_from_a_worker_thread():
    """Prefect runs tasks in threads, where math-verify's own signal-based timeout cannot work."""
    from concurrent.futures import ThreadPoolExecutor

    def run():
        with Verifier(timeout_seconds=2) as v:
            return [s.status for s in v.score_batch([("\\boxed{2}", "2"), ("\\boxed{9^{9^{9^{9^{9}}}}}", "1")])]

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(run).result() == ["correct", "timeout"]


def test_summarize_counts():
    with Verifier() as v:
        scores = v.score_batch([("\\boxed{1}", "1"), ("\\boxed{2}", "1"), ("x", "1"), ("\\boxed{1}", "")])
    summary = summarize(scores)
    assert summary["n_correct"] == 1
    assert summary["n_wrong"] == 1
    assert summary["n_no_answer"] == 1
    assert summary["n_gold_unparsable"] == 1
    assert summary["accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------- real reference solutions
def _gsm8k_labelled(shared_data):
    """GSM8K test reference solutions written four ways, labelled by construction: the original (`#### N`),
    "The answer is N.", `\\boxed{N}`, and a wrong final answer (N+1)."""
    items = []
    for line in open(shared_data / "gsm8k/test.jsonl"):
        row = json.loads(line)
        gold = gsm8k_gold(row["answer"])
        body = row["answer"].rsplit("####", 1)[0]
        items += [(row["answer"], gold, True), (body + f"The answer is {gold}.", gold, True),
                  (body + f"So the final answer is $\\boxed{{{gold}}}$", gold, True),
                  (body + f"#### {int(float(gold)) + 1}", gold, False)]
    return items


def _math_labelled(shared_data):
    """MATH-500 reference solutions against their own answer (correct) and the next problem's answer (wrong
    unless the two answers are textually the same after normalisation)."""
    rows = [json.loads(line) for line in open(shared_data / "math500/test.jsonl")]
    items = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["answer"]
        items += [(row["solution"], row["answer"], True),
                  (row["solution"], other, normalize_answer(other) == normalize_answer(row["answer"]))]
    return items


@pytest.mark.parametrize("maker, minimum", [(_gsm8k_labelled, 0.995), (_math_labelled, 0.99)],
                         ids=["gsm8k", "math500"])
def test_agreement_with_labels_on_reference_solutions(shared_data, verifier, maker, minimum):
    items = maker(shared_data)
    scores = verifier.score_batch((response, gold) for response, gold, _ in items)
    agree = sum((s.status == "correct") == label for s, (_, _, label) in zip(scores, items))
    assert agree / len(items) >= minimum, f"{agree}/{len(items)}"
    assert sum(s.status == "timeout" for s in scores) == 0


# ------------------------------------------------------------------------------------- leakage-guard matcher
@pytest.mark.parametrize("gold, text, expected", [
    ("7", "3 + 4 = 7.", True),
    ("7", "17 apples and 7.5 pears, 70 more", False),
    ("7", "it is 7.0", True),
    ("7", "\\frac{14}{2}", True),
    ("1234", "total 1,234 dollars", True),
    ("\\frac{1}{2}", "half is 1/2", True),
    ("0.5", "\\dfrac{1}{2}", True),
    ("x^2+1", "we get x^2 + 1 here", True),
    ("x^2+1", "x^2+12", False),
    ("\\dfrac{\\pi}{2}", "angle \\frac{\\pi}{2}.", True),
    ("B", "option (B)", True),
    ("B", "Bob", False),
    ("7", "", False),
])
def test_answer_in_text(gold, text, expected):
    assert answer_in_text(gold, text) is expected


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.text(alphabet="abc +=.,\n", max_size=30))
def test_answer_in_text_finds_planted_integers(n, filler):
    assert answer_in_text(str(n), f"{filler} so {n} {filler}")
    assert answer_in_text(str(n), f"{filler} \\boxed{{{n}}}")
    assert not answer_in_text(str(n), re.sub(r"\d", "", filler))
