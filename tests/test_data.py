"""Loaders on the real shared benchmark files, the arithmetic generator, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lanpo_core.config import ArithmeticConfig, DatasetConfig
from lanpo_core.data import DataError, generate_arithmetic, load_problems, problem_id


def spec(**kw) -> DatasetConfig:
    return DatasetConfig(**kw)


def test_gsm8k_train_and_test(shared_data):
    train = load_problems(spec(format="gsm8k", path=str(shared_data / "gsm8k/train.jsonl")))
    test = load_problems(spec(format="gsm8k", path="${shared}/gsm8k/test.jsonl"))
    assert (len(train), len(test)) == (7473, 1319)
    assert train.problems[0].answer == "72"
    assert train.problems[0].question.startswith("Natalia sold clips")
    assert train.report.skipped == 0
    assert train.report.rows == 7473
    # Gold answers never keep GSM8K's thousands commas.
    assert all("," not in p.answer for p in train)


def test_math500_answers_and_metadata(shared_data):
    ps = load_problems(spec(format="math", path=str(shared_data / "math500/test.jsonl")))
    assert len(ps) == 500
    first = ps.problems[0]
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"subject", "level", "unique_id"} <= set(first.metadata)


def test_math_falls_back_to_last_boxed_of_solution(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"problem": "p1", "solution": "so \\boxed{\\frac{1}{2}} and finally \\boxed{x^{2}}"},
            {"problem": "p2", "answer": "3", "solution": "\\boxed{4}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ps = load_problems(spec(format="math", path=str(path)))
    assert [p.answer for p in ps] == ["x^{2}", "3"]


def test_competition_sets(shared_data):
    aime = load_problems(spec(format="competition", path=str(shared_data / "aime24/test.jsonl")))
    amc = load_problems(spec(format="competition", path=str(shared_data / "amc23/test.jsonl")))
    assert (len(aime), len(amc)) == (30, 40)
    assert aime.problems[0].answer == "204"
    assert amc.problems[0].answer == "27"  # stored as the float 27.0 in the file


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_table_with_column_mapping(tmp_path, suffix):
    frame = pd.DataFrame({"q": ["What is 2+2?", "Name 3 primes"], "gold": ["#### 4", "#### 2,3,5"], "key": ["a", "b"]})
    path = tmp_path / f"t.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict(orient="records")))
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    ps = load_problems(spec(format="table", path=str(path), question_field="q", answer_field="gold",
                            answer_style="gsm8k", id_field="key", name="mine"))
    assert [(p.question, p.answer, p.metadata["source_id"]) for p in ps] == [
        ("What is 2+2?", "4", "a"), ("Name 3 primes", "235", "b")]
    assert ps.problems[0].source == "mine"


def test_ids_are_stable_content_hashes(shared_data):
    a = load_problems(spec(format="gsm8k", path=str(shared_data / "gsm8k/test.jsonl")))
    b = load_problems(spec(format="gsm8k", path=str(shared_data / "gsm8k/test.jsonl"), shuffle=True, seed=3))
    assert {p.id: p.question for p in a} == {p.id: p.question for p in b}
    assert a.problems[0].id == problem_id("gsm8k-test", "  " + a.problems[0].question.upper() + " ")
    assert a.problems[0].id != problem_id("other-source", a.problems[0].question)


def test_limit_and_shuffle(shared_data):
    ps = load_problems(spec(format="gsm8k", path=str(shared_data / "gsm8k/test.jsonl"), limit=5, shuffle=True))
    again = load_problems(spec(format="gsm8k", path=str(shared_data / "gsm8k/test.jsonl"), limit=5, shuffle=True))
    assert len(ps) == 5
    assert [p.id for p in ps] == [p.id for p in again]


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        load_problems(spec(format="gsm8k", path=str(path)))
    path.write_text('{"question": "a", "answer": "#### 1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        load_problems(spec(format="gsm8k", path=str(path)))
    path.write_bytes(b'{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not UTF-8"):
        load_problems(spec(format="gsm8k", path=str(path)))
    path.write_text('{"prompt": "a", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'question' \(fields: prompt, answer\)"):
        load_problems(spec(format="gsm8k", path=str(path)))


def test_missing_gold_and_duplicates_are_counted_not_silent(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "no hashes"},
            {"question": "Q1 ", "answer": "#### 1"}, {"question": "q3", "answer": "#### 3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ps = load_problems(spec(format="gsm8k", path=str(path)))
    assert [p.question for p in ps] == ["q1", "q3"]
    assert ps.report.missing_gold == [2]
    assert ps.report.duplicates == [3]
    assert ps.report.rows == 4
    assert any("skipped 1 row(s) with no gold answer (lines 2)" in r.message for r in caplog.records)


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_problems(spec(format="gsm8k", path=str(tmp_path / "e.jsonl")))
    with pytest.raises(DataError, match="data file not found"):
        load_problems(spec(format="competition", path=str(tmp_path / "none.jsonl")))
    (tmp_path / "g.jsonl").write_text('{"question": "a", "answer": "none"}\n')
    with pytest.raises(DataError, match="none of 1 rows is usable"):
        load_problems(spec(format="gsm8k", path=str(tmp_path / "g.jsonl")))


def test_hub_dataset_fails_plainly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:openai/gsm8k/main\[train\].*hub access is disabled.*local file"):
        load_problems(spec(format="hf", hf_name="openai/gsm8k", hf_config="main"))


def test_arithmetic_splits_never_share_and_are_deterministic():
    cfg = ArithmeticConfig(operations=["+", "-"])
    train = generate_arithmetic(cfg, "train", 1000)
    heldout = generate_arithmetic(cfg, "heldout", 1000)
    assert not {p.question for p in train} & {p.question for p in heldout}
    # One-digit + and - (no negatives): 100 sums + 55 differences, all used by the two splits together.
    assert len(train) + len(heldout) == 155
    assert 0.15 < len(heldout) / 155 < 0.45
    assert [p.id for p in generate_arithmetic(cfg, "train", 1000)] == [p.id for p in train]
    for p in train:
        a, op, b = p.question.removeprefix("What is ").rstrip("?").split()
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_arithmetic_large_space_is_sampled():
    cfg = ArithmeticConfig(operations=["*"], min_digits=3, max_digits=4, seed=7)
    train = generate_arithmetic(cfg, "train", 300)
    heldout = generate_arithmetic(cfg, "heldout", 300)
    assert len(train) == len(heldout) == 300
    assert not {p.question for p in train} & {p.question for p in heldout}
    a, _, b = train.problems[0].question.removeprefix("What is ").rstrip("?").split()
    assert int(train.problems[0].answer) == int(a) * int(b)
    assert 100 <= int(a) <= 9999


def test_operand_ranges_make_chains_with_precedence_and_disjoint_splits():
    cfg = ArithmeticConfig(operations=["+", "-", "*"], operand_ranges=[[0, 9], [0, 9], [0, 9]], seed=3)
    train, heldout = generate_arithmetic(cfg, "train", 300), generate_arithmetic(cfg, "heldout", 300)
    assert len(train) == 300 and len(heldout) == 300
    assert not {p.question for p in train} & {p.question for p in heldout}
    for p in [*train, *heldout]:
        expression = p.question.removeprefix("What is ").removesuffix("?").replace("×", "*")
        assert int(p.answer) == eval(expression) >= 0  # noqa: S307 (digits and + - * only)
    two = ArithmeticConfig(operations=["-"], operand_ranges=[[10, 99], [0, 9]])
    assert all(p.question.split()[2].isdigit() and len(p.question.split()[2]) == 2
               for p in generate_arithmetic(two, "train", 50))


def test_operand_ranges_must_be_ordered():
    with pytest.raises(ValueError, match=r"operand_ranges.*\[5, 2\]"):
        ArithmeticConfig(operand_ranges=[[5, 2], [0, 9]])
