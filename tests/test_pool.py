"""Experience pool (lanpo_core/pool.py): real LanceDB, the real bundled MiniLM embedder, no mocks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lanpo_core.config import PoolConfig
from lanpo_core.data import Problem, problem_id
from lanpo_core.pool import Attempt, ExperiencePool, LessonSet, PoolError, RolloutRecord, lesson_key, text_key

REPO = Path(__file__).resolve().parents[1]
FAST = settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="session")
def embedder():
    from lanpo_core.models import load_embedder

    return load_embedder("all-minilm-l6-v2")


_ENCODED: dict[str, np.ndarray] = {}


def _encode(embedder, text: str) -> np.ndarray:
    if text not in _ENCODED:
        _ENCODED[text] = embedder.encode([text], normalize_embeddings=True)[0]
    return _ENCODED[text]


class CountingEmbedder:
    """The real embedder, with a count of the texts it was asked to encode."""

    def __init__(self, model):
        self.model, self.texts = model, []

    def encode(self, texts, **kw):
        self.texts.extend(texts)
        return self.model.encode(texts, **kw)


def prob(question: str, answer: str = "1", source: str = "test") -> Problem:
    return Problem(problem_id(source, question), question, answer, source, {})


def rollouts(problems, group: int, reward=lambda p, i: float(i % 2 == 0), response=None, kind="plain"):
    out = []
    for p in problems:
        for i in range(group):
            text = response(p, i) if response else f"Working on {p.question}: attempt {i}. \\boxed{{{i}}}"
            out.append(RolloutRecord.for_problem(p, rollout_index=i, kind=kind, response=text,
                                                 reward=reward(p, i), extracted_answer=str(i), prompt_tokens=10 + i,
                                                 completion_tokens=20 + i, context_ids=[f"ctx{i}"] if i else []))
    return out


@pytest.fixture(scope="session")
def gsm8k_questions(shared_data) -> list[str]:
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:200]]


# ------------------------------------------------------------------------------------------ writing
def test_write_step_is_one_version_with_all_fields(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    assert pool.version == 0
    assert pool.count() == 0
    assert pool.earlier_attempts(["x"]) == {"x": []}
    problems = [prob(f"What is {a} + {a + 1}?") for a in range(3)]
    report = pool.write_step(0, rollouts(problems, 4))
    assert report.written == 12
    assert not report.refused
    assert report.embedded == 3
    assert report.version == pool.version >= report.data_version  # maintenance (the uid index) may add one
    report2 = pool.write_step(1, rollouts(problems, 2), policy_version=7)
    assert report2.data_version == report2.version == report.version + 1, "one append per step = one version"
    assert pool.open_at(report.data_version).count() == pool.open_at(report.version).count() == 12
    rows = pool.table.to_arrow().to_pylist()
    row = next(r for r in rows if r["uid"] == f"run1/0/{problems[1].id}/3")
    expected = {"run_id": "run1", "step": 0, "problem_id": problems[1].id, "rollout_index": 3, "kind": "plain",
                "problem_text": problems[1].question, "context_ids": ["ctx3"], "reward": 0.0,
                "extracted_answer": "3", "prompt_tokens": 13, "completion_tokens": 23, "policy_version": 0}
    assert {k: row[k] for k in expected} == expected
    assert len(row["vector"]) == 384
    assert abs(np.linalg.norm(row["vector"]) - 1) < 1e-4
    assert {r["policy_version"] for r in rows if r["step"] == 1} == {7}
    assert pool.versions()[-1] == pool.version


def test_a_table_whose_creation_never_committed_is_written_again(tmp_path, embedder):
    """A disk that filled up while the table was first created leaves its folder without a version; the step's
    write must succeed on the next attempt instead of failing with "Table 'experiences' was not found"."""
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    problems = [prob(f"What is {a} + {a + 1}?") for a in range(2)]
    pool.write_step(0, rollouts(problems, 2))
    manifests = list((tmp_path / "pool" / "experiences.lance" / "_versions").glob("*.manifest"))
    assert manifests, "lance keeps one manifest per version here"
    for m in manifests:
        m.unlink()
    assert ExperiencePool(tmp_path / "pool", "run1", embedder=embedder, read_only=True).count() == 0
    again = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    assert again.write_step(0, rollouts(problems, 2)).written == 4
    assert ExperiencePool(tmp_path / "pool", "run1", embedder=embedder).count() == 4


def test_open_at_reopens_every_step(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    p = prob("What is 2 + 2?")
    versions = [pool.write_step(step, rollouts([p], 2)).version for step in range(3)]
    for step, version in enumerate(versions):
        view = pool.open_at(version)
        assert view.count() == 2 * (step + 1)
        assert view.version == version
        assert view.earlier_attempts([p.id])[p.id][0].step == step
        with pytest.raises(PoolError):
            view.write_step(9, rollouts([p], 1))
    assert pool.count() == 6  # the live pool is untouched by the views


# ------------------------------------------------------------------------------------- crash safety
class _InterruptedPool(ExperiencePool):
    """Streams the step's append in small batches and fails after `fail_after` of them."""

    fail_after = 2

    def _append(self, data):
        batches = data.to_batches(max_chunksize=4)

        def stream():
            for i, batch in enumerate(batches):
                if i == self.fail_after:
                    raise RuntimeError("writer died mid-append")
                yield batch

        return super()._append(pa.RecordBatchReader.from_batches(data.schema, stream()))


def test_write_interrupted_mid_append_leaves_previous_version(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    problems = [prob(f"What is {a} + 1?") for a in range(4)]
    v1 = pool.write_step(0, rollouts(problems, 2)).version
    before = pool.table.to_arrow().sort_by("uid")
    broken = _InterruptedPool(tmp_path / "pool", "run1", embedder=embedder)
    with pytest.raises(Exception, match="mid-append"):
        broken.write_step(1, rollouts(problems, 4))
    fresh = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    assert fresh.version == v1
    assert fresh.count() == 8
    assert fresh.count(step=1) == 0
    assert fresh.table.to_arrow().sort_by("uid").equals(before)
    assert fresh.write_step(1, rollouts(problems, 4)).version == v1 + 1
    assert fresh.count() == 24


def test_error_while_building_the_batch_writes_nothing(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    p = prob("What is 5 + 5?")
    v1 = pool.write_step(0, rollouts([p], 2)).version
    lessons = [LessonSet(("a", "b"), ("Add carefully.",), 1, p.id, p.question)]

    def records():
        yield from rollouts([p], 2)
        yield "not a record"  # a structural bug in the caller, half-way through the step

    with pytest.raises(TypeError, match="RolloutRecord"):
        pool.write_step(1, records(), lessons=lessons)
    for bad, error, match in (
            ([LessonSet(("a",), ("Add carefully.",), 2, p.id, p.question)], PoolError, "step is 2"),
            ([LessonSet(("a",), ("Add carefully.",), None, p.id, p.question)], PoolError, "step is None"),
            ([LessonSet(("a",), (), 1, p.id, p.question)], PoolError, "non-empty"),
            ([{"source_ids": ["a"]}], TypeError, "LessonSet"),
            (lessons + [LessonSet(("c",), (b"bytes",), 1, p.id, p.question)], TypeError, r"lessons\[\] must be a str")):
        with pytest.raises(error, match=match):
            pool.write_step(1, rollouts([p], 2), lessons=bad)
    assert pool.version == v1
    assert pool.count() == 2
    assert pool.count(kind="lesson") == 0
    report = pool.write_step(1, rollouts([p], 2), lessons=lessons)  # the retry writes the whole step
    assert (report.written, report.lessons_written, report.version) == (2, 1, v1 + 1)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, pyarrow as pa
    from lanpo_core.pool import ExperiencePool, RolloutRecord

    class Dying(ExperiencePool):
        def _append(self, data):
            if data.num_rows > 1000:
                batches = data.to_batches(max_chunksize=200)
                def stream():
                    for i, batch in enumerate(batches):
                        if i == 4:
                            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers
                        yield batch
                data = pa.RecordBatchReader.from_batches(data.schema, stream())
            return super()._append(data)

    pool = Dying(sys.argv[1], "run1")
    rng = np.random.default_rng(0)
    pool.remember_embeddings({f"p{i}": rng.normal(size=384) for i in range(50)})
    recs = lambda n: [RolloutRecord(f"p{i % 50}", f"question {i % 50}", i, "plain", "x" * 2000, 1.0)
                      for i in range(n)]
    print(pool.write_step(0, recs(100)).version, flush=True)
    print(len(os.listdir(os.path.join(sys.argv[1], "experiences.lance", "data"))), flush=True)
    pool.write_step(1, recs(5000))
    print("not reached", flush=True)
""")


def test_writer_killed_mid_append_leaves_previous_version_readable(tmp_path):
    folder = tmp_path / "pool"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    version, files_before = map(int, proc.stdout.split()[:2])
    assert "not reached" not in proc.stdout
    data_files = os.listdir(folder / "experiences.lance" / "data")
    assert len(data_files) > files_before, "the killed append had started writing data"
    pool = ExperiencePool(folder, "run1")
    assert pool.version == version
    assert pool.count() == 100
    assert pool.count(step=1) == 0
    assert len(pool.earlier_attempts(["p3"], 8)["p3"]) == 2
    pool.remember_embeddings({f"p{i}": np.ones(384) for i in range(50)})
    report = pool.write_step(1, [RolloutRecord("p1", "question 1", 0, "plain", "y", 0.0)])
    assert report.version == version + 1
    assert pool.count() == 101


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_or_cut_and_counted(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder, max_response_chars=100,
                          max_problem_chars=200)
    good = prob("What is 1 + 1?")
    first = pool.write_step(0, rollouts([good], 2))
    stored = pool.table.to_arrow().sort_by("uid")

    def rec(i, **kw):
        base = dict(problem_id=good.id, problem_text=good.question, rollout_index=i, kind="plain",
                    response="fine", reward=1.0)
        return RolloutRecord(**{**base, **kw})

    batch = [
        rec(0, problem_text=""), rec(1, problem_text="   \n"), rec(2, problem_id=""),
        rec(3, reward=float("nan")), rec(4, reward=float("inf")), rec(5, reward="1"), rec(6, reward=True),
        rec(7, kind="mystery"), rec(8, rollout_index=-1), rec(9, completion_tokens=-5),
        rec(10, problem_text="x" * 201), rec(11, extracted_answer="9" * 1500),
        rec(13, response="y" * 5000), rec(14, reward=None, response=""), rec(15),
        rec(15, response="same uid again"),
    ]
    report = pool.write_step(1, batch)
    assert dict(report.refused) == {"empty_problem_text": 2, "empty_problem_id": 1, "bad_reward": 4, "bad_kind": 1,
                                    "bad_rollout_index": 1, "bad_token_count": 1, "problem_too_long": 1,
                                    "duplicate": 1}
    assert dict(report.repaired) == {"truncated_answer": 1, "truncated_response": 1}
    assert report.written == 4
    rows = {r["rollout_index"]: r for r in pool.table.search().where("step = 1").limit(None).to_arrow().to_pylist()}
    assert rows[11]["extracted_answer"] == "9" * 1000
    assert rows[13]["response"] == "y" * 100
    assert rows[13]["response_truncated"]
    assert rows[14]["reward"] is None
    assert rows[14]["content_chars"] == 0
    again = pool.write_step(0, rollouts([good], 3))  # re-running a committed step: only the new rollout goes in
    assert again.refused["duplicate"] == 2
    assert again.written == 1
    old = pool.table.search().where(f"uid IN ('run1/0/{good.id}/0', 'run1/0/{good.id}/1')").limit(None) \
        .to_arrow().sort_by("uid")
    assert old.equals(stored), "nothing already stored is lost or changed"
    assert pool.counters["refused_bad_reward"] == 4
    assert pool.counters["refused_duplicate"] == 3
    assert first.version < report.version < again.version
    assert 14 not in [a.rollout_index for a in pool.earlier_attempts([good.id], 8)[good.id] if a.step == 1]
    # a field of the wrong type is a caller bug: it raises, naming the field, and nothing is written
    version = pool.version
    for field, value in (("response", b"caf\xc3\xa9"), ("problem_id", 7), ("context_ids", [None])):
        with pytest.raises(TypeError, match=rf"RolloutRecord\.{field}"):
            pool.write_step(2, [rec(0), rec(1, **{field: value})])
    assert pool.version == version
    assert pool.count(step=2) == 0


def test_pool_refuses_a_different_embedder_and_bad_arguments(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    pool.write_step(0, rollouts([prob("What is 1 + 2?")], 1))
    with pytest.raises(PoolError, match="embedding model"):
        ExperiencePool(tmp_path / "pool", "run2", embedding_model="some/other-model")
    with pytest.raises(PoolError):
        ExperiencePool(tmp_path / "pool", "")
    with pytest.raises(PoolError):
        pool.write_step(-1, [])
    with pytest.raises(PoolError, match="run dir"):
        ExperiencePool.from_config(PoolConfig(), "r")
    assert ExperiencePool.from_config(PoolConfig(), "r", run_dir=tmp_path / "run").uri == str(tmp_path / "run" / "pool")
    with pytest.raises(ValueError, match="search"):  # the LanceDB vector-search option is gone
        PoolConfig(search="lance")


# ---------------------------------------------------------------------------------------- embeddings
def test_problem_is_embedded_once_and_reused_across_processes(tmp_path, embedder):
    counting = CountingEmbedder(embedder)
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=counting)
    problems = [prob("Tom has three apples and buys two more. How many now?"), prob("What is 4 + 4?")]
    pool.write_step(0, rollouts(problems, 3))
    pool.write_step(1, rollouts(problems, 3))
    pool.similar_experiences(problems[0].id, problems[0].question, min_similarity=None)
    assert sorted(counting.texts) == sorted(p.question for p in problems)
    again = CountingEmbedder(embedder)
    reopened = ExperiencePool(tmp_path / "pool", "run2", embedder=again)  # another run, same folder
    vec = reopened.embedding(problems[0].id, problems[0].question)
    reopened.write_step(0, rollouts(problems, 1))
    assert again.texts == [], "vectors come from the stored rows"
    expected = embedder.encode([problems[0].question], normalize_embeddings=True)[0]
    assert np.allclose(vec, expected, atol=1e-5)


# --------------------------------------------------------------------------------------- runs, stats
def test_runs_share_a_folder_without_clashing(tmp_path, embedder):
    a = ExperiencePool(tmp_path / "pool", "run-a", embedder=embedder)
    b = ExperiencePool(tmp_path / "pool", "run-b", embedder=embedder)
    problems = [prob("What is 3 + 4?"), prob("What is 3 + 5?"), prob("What is 6 + 2?")]
    a.write_step(0, rollouts(problems, 2, reward=lambda p, i: 1.0))
    b.write_step(0, rollouts(problems[:1], 3, reward=lambda p, i: 1.0))
    b.write_step(1, rollouts(problems[:1], 1))
    a.write_step(1, [], lessons=[LessonSet(("x",), ("Add the ones first.",), 1, problems[0].id,
                                           problems[0].question)])
    assert a.count() == 6
    assert b.count() == 4
    assert a.count(all_runs=True) == 11
    assert all(x.uid.startswith("run-b/") for x in b.earlier_attempts([problems[0].id], 8)[problems[0].id])
    assert b.similar_experiences(problems[0].id, problems[0].question, min_similarity=None) == []
    assert len(a.similar_experiences(problems[0].id, problems[0].question, min_similarity=None)) == 2
    assert a.get_lessons(["x"]) == ["Add the ones first."]
    assert b.get_lessons(["x"]) is None
    stats = a.stats()
    assert {k: stats[k] for k in ("rows", "lessons", "problems", "runs", "rows_all_runs")} == {
        "rows": 6, "lessons": 1, "problems": 3, "runs": 2, "rows_all_runs": 11}
    assert stats["by_kind"]["plain"]["success_rate"] == 1.0
    assert stats["prompt_tokens"] == 3 * (10 + 11)
    assert stats["completion_tokens"] == 3 * (20 + 21)


def test_lessons_are_written_in_the_step_version_and_only_once(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    p = prob("What is 7 + 1?")
    v0 = pool.write_step(0, rollouts([p], 1)).version
    lessons = [LessonSet(("u2", "u1", "u2"), ("Line up the digits.",), 1, p.id, p.question, "fake", 5),
               LessonSet(("u1", "u2"), ("made again for the same sources",), 1, p.id, p.question)]
    assert lessons[0].key == lesson_key(["u1", "u2"])
    report = pool.write_step(1, rollouts([p], 1), lessons=lessons)
    assert report.data_version == v0 + 1
    assert (report.written, report.lessons_written) == (1, 1), "one row per source set: the first set wins"
    assert pool.get_lessons(["u1", "u2"]) == ["Line up the digits."]
    assert pool.open_at(v0).get_lessons(["u1", "u2"]) is None
    fresh = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    assert fresh.get_lessons(["u2", "u1"]) == ["Line up the digits."]
    assert fresh.get_lessons(["u1"]) is None
    row = fresh.table.search().where("kind = 'lesson'").limit(None).to_arrow().to_pylist()[0]
    expected = {"uid": f"run1/lesson/{lesson_key(['u1', 'u2'])}", "context_ids": ["u1", "u2"],
                "lessons": ["Line up the digits."], "response": "Line up the digits.", "step": 1,
                "problem_id": p.id, "problem_text": p.question, "producer": "fake", "policy_version": 5,
                "rollout_index": -1, "reward": None}
    assert {k: row[k] for k in expected} == expected
    assert np.allclose(row["vector"], fresh.embedding(p.id, p.question))
    assert fresh.count() == 2, "lesson rows are not rollouts"
    # repeating a committed step (a retry after a crash, from a new process) adds nothing and no version
    again = fresh.write_step(1, rollouts([p], 1), lessons=lessons)
    assert (again.written, again.lessons_written) == (0, 0)
    assert again.version == fresh.version == report.version
    assert fresh.table.count_rows() == 3
    later = fresh.write_step(2, [], lessons=[LessonSet(("u1", "u2"), ("something else",), 2, p.id, p.question)])
    assert later.lessons_written == 0, "a stored set is never written twice"
    assert fresh.get_lessons(["u1", "u2"]) == ["Line up the digits."]


# ---------------------------------------------------------------------------------------- reflection
def test_earlier_attempts_selection_is_by_recency_or_seeded_chance(tmp_path, embedder):
    pool = ExperiencePool(tmp_path / "pool", "run1", embedder=embedder)
    p, q = prob("What is 9 + 1?"), prob("What is 9 + 2?")
    for step in range(3):
        pool.write_step(step, rollouts([p, q], 4, response=lambda pr, i: "" if i == 0 else f"try {i}"))
    got = pool.earlier_attempts([p.id, q.id, "unknown"], 2)
    assert [(a.step, a.rollout_index) for a in got[p.id]] == [(2, 1), (2, 2)]
    assert got["unknown"] == []
    assert all(isinstance(a, Attempt) and not hasattr(a, "reward") for a in got[q.id])
    assert [(a.step, a.rollout_index) for a in pool.earlier_attempts([p.id], 1, before_step=2)[p.id]] == [(1, 1)]
    r1 = pool.earlier_attempts([p.id], 3, "random", seed=1)[p.id]
    assert r1 == pool.earlier_attempts([p.id], 3, "random", seed=1)[p.id]
    seen = {a.uid for s in range(40) for a in pool.earlier_attempts([p.id], 1, "random", seed=s)[p.id]}
    assert len(seen) >= 6, "uniform over the attempts"
    assert all(not u.endswith("/0") for u in seen), "empty attempts are never returned"


@FAST
@given(rewards=st.lists(st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0.0, 1.0])), min_size=2,
                        max_size=8),
       selection=st.sampled_from(["most_recent", "random"]), n=st.integers(1, 4), seed=st.integers(0, 3),
       data=st.data())
def test_chosen_attempts_do_not_depend_on_rewards(tmp_path_factory, embedder, rewards, selection, n, seed, data):
    perm = data.draw(st.permutations(rewards))
    p = prob("What is 6 + 3?")
    vector = {p.id: _encode(embedder, p.question)}  # embedded once for all examples (the cache is tested above)
    pool = ExperiencePool(tmp_path_factory.mktemp("pool"), "a", embedder=embedder)
    other = ExperiencePool(pool.uri, "b", embedder=embedder)
    pool.remember_embeddings(vector)
    other.remember_embeddings(vector)
    for target, rs in ((pool, rewards), (other, perm)):
        for step in range(2):
            target.write_step(step, [RolloutRecord.for_problem(p, rollout_index=i, kind="plain",
                                                               response=f"answer {i} at {step}", reward=r)
                                     for i, r in enumerate(rs)])
    pick = lambda pl: [(a.step, a.rollout_index, a.response) for a in
                       pl.earlier_attempts([p.id], n, selection, seed=seed)[p.id]]
    assert pick(pool) == pick(other)


# --------------------------------------------------------------------------------------- abstraction
@pytest.fixture(scope="module")
def retrieval_pool(tmp_path_factory, embedder, gsm8k_questions):
    """60 GSM8K problems (2 steps x 2 rollouts each, mixed rewards), plus planted duplicates of problem 0:
    the same text under another id (case and spacing changed) and a one-word edit (cosine >= 0.9)."""
    questions = gsm8k_questions[:60]
    problems = [prob(q, source="gsm8k") for q in questions]
    base = questions[0]
    same_text = prob("  " + base.upper().replace(" ", "  ") + " ", source="copy")
    near = prob(base.replace("friends", "pals", 1) if "friends" in base else base + " Think.", source="near")
    planted = [same_text, near]
    pool = ExperiencePool(tmp_path_factory.mktemp("retrieval"), "run1", embedder=embedder)
    rng = random.Random(0)
    rewards = {}
    for step in range(2):
        recs = []
        for p in problems + planted:
            for i in range(2):
                r = 1.0 if p in planted else rng.choice([0.0, 0.0, 1.0, None])
                rewards[(p.id, step, i)] = r
                recs.append(RolloutRecord.for_problem(p, rollout_index=i, kind="plain", reward=r,
                                                      response="" if rng.random() < 0.05 else f"solution {i}"))
        pool.write_step(step, recs)
    vectors = pool.embed_problems(problems + planted)
    rows = pool.table.search().select(["problem_id", "step", "rollout_index", "reward", "content_chars", "uid",
                                       "text_key"]).limit(None).to_arrow().to_pylist()
    return pool, problems, planted, vectors, rows


def oracle(pool, rows, vectors, query, top_k, min_sim, dup, successful_only, choice):
    qv = vectors[query.id]
    sims = {pid: float(v @ qv) for pid, v in vectors.items()}
    eligible = {}
    for r in rows:
        if r["problem_id"] == query.id or r["text_key"] == text_key(query.question) or r["content_chars"] == 0:
            continue
        if successful_only and not (r["reward"] is not None and r["reward"] > 0):
            continue
        s = sims[r["problem_id"]]
        if s >= dup or (min_sim is not None and s < min_sim):
            continue
        eligible.setdefault(r["problem_id"], []).append(r)
    ranked = sorted(eligible, key=lambda pid: (-sims[pid], pid))[:top_k]
    pickf = min if choice == "earliest" else max
    return [(pid, pickf(eligible[pid], key=lambda r: (r["step"], r["rollout_index"]))["uid"]) for pid in ranked], sims


@FAST
@given(qi=st.integers(0, 59), top_k=st.integers(1, 8),
       min_sim=st.one_of(st.none(), st.integers(20, 80).map(lambda x: x / 100)),
       dup=st.sampled_from([0.9, 0.95, 0.97, 1.0]), successful_only=st.booleans(),
       choice=st.sampled_from(["earliest", "latest"]))
def test_similar_experiences_match_brute_force(retrieval_pool, qi, top_k, min_sim, dup, successful_only, choice):
    pool, problems, planted, vectors, rows = retrieval_pool
    query = problems[qi]
    want, sims = oracle(pool, rows, vectors, query, top_k, min_sim, dup, successful_only, choice)
    for s in sims.values():  # float round-off exactly at a threshold would make the comparison ambiguous
        assume(all(abs(s - t) > 1e-5 for t in (min_sim, dup) if t is not None))
    got = pool.similar_experiences(query.id, query.question, top_k=top_k, min_similarity=min_sim,
                                   duplicate_similarity=dup, successful_only=successful_only, source_choice=choice)
    assert [(e.problem_id, e.uid) for e in got] == want
    assert len(got) <= top_k
    assert len({e.problem_id for e in got}) == len(got)
    for e in got:
        assert e.problem_id != query.id
        assert min_sim is None or e.similarity >= min_sim
        assert e.similarity < dup
        assert abs(e.similarity - sims[e.problem_id]) < 1e-5
        assert not successful_only or (e.reward is not None and e.reward > 0)
    assert [e.similarity for e in got] == sorted((e.similarity for e in got), reverse=True)


def test_same_problem_and_near_duplicates_are_never_returned(retrieval_pool):
    pool, problems, planted, vectors, rows = retrieval_pool
    base, same_text, near = problems[0], planted[0], planted[1]
    assert text_key(same_text.question) == text_key(base.question)
    assert same_text.id != base.id
    near_sim = float(vectors[near.id] @ vectors[base.id])
    assert 0.9 <= near_sim < 0.999

    def ids(top_k=10, **kw):
        return [e.problem_id for e in pool.similar_experiences(base.id, base.question, top_k=top_k,
                                                               min_similarity=None, **kw)]

    assert base.id not in ids()
    assert same_text.id not in ids()
    assert near.id not in ids()
    assert near.id in ids(duplicate_similarity=1.0), "only the threshold kept it out"
    assert same_text.id not in ids(duplicate_similarity=1.0), "identical normalised text is always excluded"
    assert len(ids()) == 10
    assert len(ids(top_k=3)) == 3
    assert pool.similar_experiences(base.id, base.question, min_similarity=0.99) == []


def test_reopened_pool_answers_like_the_live_one(retrieval_pool, embedder):
    """The in-memory run index rebuilt from the table equals the one kept current by the writes."""
    pool, problems, planted, vectors, rows = retrieval_pool
    fresh = ExperiencePool(pool.uri, "run1", embedder=embedder)
    for p in problems[:10]:
        for kw in ({}, {"successful_only": False, "min_similarity": 0.3, "top_k": 6}, {"before_step": 1}):
            live = pool.similar_experiences(p.id, p.question, **kw)
            assert fresh.similar_experiences(p.id, p.question, **kw) == live
    assert fresh.earlier_attempts([p.id for p in problems], 3) == pool.earlier_attempts([p.id for p in problems], 3)
    assert fresh.counters["index_loads"] == 1
    assert fresh.counters["embedded"] == 0
