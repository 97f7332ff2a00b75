"""The experience pool (METHOD.md steps 3, 4 and 7): every rollout of every run, stored in LanceDB.

One LanceDB table, `experiences`, at `PoolConfig.uri`. One row per rollout (`RolloutRecord`) and one per stored
lesson set (`LessonSet`, `kind = 'lesson'`). Every row carries `run_id`; every read filters on it.

* **One step, one version.** `write_step(step, records, lessons)` validates and embeds everything, then appends
  rollouts and new lesson sets in one commit: a step that fails or is killed leaves the previous version. Rows
  (uids) and lesson sets (keys) already stored are skipped, so repeating a write adds nothing. `open_at(version)`
  reopens any step's pool read-only; old versions are kept.
* **Embeddings once** per problem: memory cache, else any stored row of it, else the embedder. A pool refuses an
  embedder other than the one its schema records.
* **Bad rows are refused** and counted in `WriteReport.refused` (empty problem text or id, an over-long problem,
  a NaN/infinite/non-numeric reward (None, "unscorable", is kept), an unknown kind, a negative index or token
  count, a duplicate uid). Over-long responses and extracted answers keep their head (`WriteReport.repaired`).
  A field of the wrong type is a caller bug and raises before anything is written.
* **Reads go through an in-memory run index** (row ids, steps, flags, one vector per problem, lesson sets), loaded
  once and kept current by this pool's own writes (one writer per run). Similar-problem search is an exact cosine
  over the run's distinct problems; the chosen rows are then fetched by uid.
* **Reflection reads are reward-agnostic**: `earlier_attempts` looks at step, rollout index and emptiness only.
* **Similar experiences** come from other problems only (not the same id, identical normalised text or a
  near-duplicate), one per problem.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .config import BUNDLED_EMBEDDER

log = logging.getLogger(__name__)

TABLE_NAME = "experiences"
SCHEMA_VERSION = "1"
ROLLOUT_KINDS = ("plain", "reflection", "abstraction")
LESSON_KIND = "lesson"
MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this keep their head (a runaway `last_number` or `\\boxed{}` capture)."""
KEEP_VERSIONS = timedelta(days=36500)
"""`optimize` prunes versions older than this: in practice never, so every step's version stays readable."""
UID_INDEX_MIN_ROWS = 5000
"""The BTREE index on `uid` is built once the table holds this many rows (below that a scan is cheap)."""

_META_MODEL = b"lanpo.embedding_model"
_META_SCHEMA = b"lanpo.schema_version"


# ---------------------------------------------------------------------------------------------- records
@dataclass
class RolloutRecord:
    """One rollout to store. `write_step` adds the run id, the step and the problem's embedding."""

    problem_id: str
    """Stable problem id (`Problem.id`)."""
    problem_text: str
    """The problem as shown to the model (`Problem.question`)."""
    rollout_index: int
    """Position of the rollout in its group (0..G-1); unique per (run, step, problem)."""
    kind: str
    """`plain`, `reflection` or `abstraction`."""
    response: str
    """The generated text."""
    reward: float | None
    """Verifier reward; None when the item was unscorable (gold unparsable)."""
    extracted_answer: str | None = None
    """The answer the verifier extracted, if any."""
    context_ids: Sequence[str] = ()
    """Ids of the experiences (or lesson set) the rollout's context was built from; empty for plain rollouts."""
    policy_version: int | None = None
    """Policy version that generated it; None means the step number."""
    prompt_tokens: int = 0
    """Tokens in the prompt actually used (context included)."""
    completion_tokens: int = 0
    """Tokens generated."""

    @classmethod
    def for_problem(cls, problem: Any, **fields: Any) -> "RolloutRecord":
        """Build from anything with `.id` and `.question` (a `data.Problem`) plus the remaining fields."""
        return cls(problem_id=problem.id, problem_text=problem.question, **fields)

    @classmethod
    def coerce(cls, value: "RolloutRecord | Mapping[str, Any]") -> "RolloutRecord":
        if isinstance(value, RolloutRecord):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        raise TypeError(f"expected a RolloutRecord or a mapping, got {type(value).__name__}")


@dataclass(frozen=True)
class LessonSet:
    """Lessons made for one set of source experiences, stored with a step by `write_step(..., lessons=...)`.

    Plain data (it travels in `feedback.FeedbackBatch`, which Prefect persists)."""

    source_ids: tuple[str, ...]
    """Uids of the experiences the lessons were made from; the set (order and repeats aside) is the cache key."""
    lessons: tuple[str, ...]
    step: int | None
    """Step the lessons were made in (None: made outside training, e.g. for evaluation; never stored)."""
    problem_id: str
    """The problem the lessons were first made for (its vector is stored with them)."""
    problem_text: str
    producer: str = "policy"
    """Abstractor name (`abstraction.abstractor`)."""
    policy_version: int | None = None
    """Policy version of the abstractor; None means the step."""

    @property
    def key(self) -> str:
        return lesson_key(self.source_ids)


@dataclass(frozen=True)
class Attempt:
    """An earlier attempt at the same problem, for reflection. Deliberately carries no reward."""

    uid: str
    problem_id: str
    step: int
    rollout_index: int
    kind: str
    response: str
    extracted_answer: str | None


@dataclass(frozen=True)
class Experience:
    """A stored rollout of another problem, returned by `similar_experiences`."""

    uid: str
    problem_id: str
    step: int
    rollout_index: int
    kind: str
    problem_text: str
    response: str
    extracted_answer: str | None
    reward: float | None
    similarity: float
    """Exact cosine similarity between this experience's problem and the query problem."""


@dataclass
class WriteReport:
    """What one `write_step` did. Counts are also added to `ExperiencePool.counters`."""

    step: int
    version: int = 0
    """Table version after the step (and after any maintenance it triggered): pass it to `open_at`."""
    data_version: int = 0
    """Version created by the step's append itself (equal to `version` unless maintenance ran)."""
    written: int = 0
    """Rollout rows appended."""
    lessons_written: int = 0
    """Lesson rows appended."""
    refused: Counter = field(default_factory=Counter)
    """Rows refused, by reason."""
    repaired: Counter = field(default_factory=Counter)
    """Rows stored with a field cut to its head (`truncated_response`, `truncated_answer`)."""
    embedded: int = 0
    """Problems embedded during this write (the rest came from the cache or the pool)."""
    seconds: float = 0.0

    def as_metrics(self, prefix: str = "pool/") -> dict[str, float]:
        out = {f"{prefix}written": float(self.written), f"{prefix}lessons_written": float(self.lessons_written),
               f"{prefix}version": float(self.version), f"{prefix}write_seconds": self.seconds,
               f"{prefix}refused": float(sum(self.refused.values()))}
        out.update({f"{prefix}refused_{k}": float(v) for k, v in self.refused.items()})
        out.update({f"{prefix}repaired_{k}": float(v) for k, v in self.repaired.items()})
        return out


class PoolError(RuntimeError):
    """The pool cannot do what was asked (read-only view, incompatible embedder, bad argument)."""


# ---------------------------------------------------------------------------------------------- helpers
def sql_str(value: str) -> str:
    """A SQL string literal for LanceDB filters (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _sql_in(values: Iterable[str]) -> str:
    return "(" + ", ".join(sql_str(v) for v in values) + ")"


def normalize_text(text: str) -> str:
    """Text used for identical-problem detection: NFKC, lower case, white space collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def text_key(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def lesson_key(source_ids: Iterable[str]) -> str:
    """Cache key of a lesson set: hash of the sorted, de-duplicated source experience ids."""
    blob = "\n".join(sorted(set(source_ids)))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


def _reward(value: Any) -> tuple[float | None, bool]:
    """(reward, ok). None is a valid 'unscorable'; NaN, infinities and non-numbers are not."""
    if value is None:
        return None, True
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None, False
    value = float(value)
    return (value, True) if math.isfinite(value) else (None, False)


def _schema(dim: int, embedding_model: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("step", pa.int64(), nullable=False),
            pa.field("problem_id", pa.string(), nullable=False),
            pa.field("rollout_index", pa.int32(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("problem_text", pa.string(), nullable=False),
            pa.field("text_key", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("context_ids", pa.list_(pa.string())),
            pa.field("response", pa.string()),
            pa.field("content_chars", pa.int32()),
            pa.field("response_truncated", pa.bool_()),
            pa.field("extracted_answer", pa.string()),
            pa.field("reward", pa.float64()),
            pa.field("policy_version", pa.int64()),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("completion_tokens", pa.int32()),
            pa.field("lesson_key", pa.string()),
            pa.field("lessons", pa.list_(pa.string())),
            pa.field("producer", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata={_META_MODEL: embedding_model.encode(), _META_SCHEMA: SCHEMA_VERSION.encode()},
    )


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(rows, dim) float32 matrix of a fixed-size-list vector column."""
    arr = column.combine_chunks()
    dim = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), dim)


_ATTEMPT_COLUMNS = ["uid", "problem_id", "step", "rollout_index", "kind", "response", "extracted_answer"]
_EXPERIENCE_COLUMNS = ["uid", "problem_id", "step", "rollout_index", "kind", "problem_text", "response",
                       "extracted_answer", "reward"]


# ------------------------------------------------------------------------------------------- run index
@dataclass(frozen=True)
class _Row:
    step: int
    index: int
    uid: str
    success: bool
    """reward > 0. Only abstraction retrieval (other problems) may look at it; reflection never does."""
    nonempty: bool


class _RunIndex:
    """In-memory catalogue of one run's rows at one table version: ids, steps, a success flag, no text; one
    vector per problem (a problem-level flat index); and the run's lesson sets. Built from the table on first use,
    then kept current by this pool's own writes (rows other processes add to the run are seen after reopening)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.pids: list[str] = []
        self.pos: dict[str, int] = {}
        self.mat = np.zeros((0, dim), dtype=np.float32)
        self.keys = np.zeros(0, dtype=np.uint64)
        self.first_ok = np.zeros(0)
        """Earliest step with a non-empty rollout of reward > 0 (inf: none)."""
        self.first_any = np.zeros(0)
        """Earliest step with a non-empty rollout (inf: none)."""
        self.rows: dict[str, list[_Row]] = {}
        self.uids: set[str] = set()
        self.lessons: dict[str, list[str]] = {}

    def _grow(self) -> None:
        cap = max(64, 2 * len(self.mat))
        self.mat = np.concatenate([self.mat, np.zeros((cap - len(self.mat), self.dim), dtype=np.float32)])
        self.keys = np.concatenate([self.keys, np.zeros(cap - len(self.keys), dtype=np.uint64)])
        self.first_ok = np.concatenate([self.first_ok, np.full(cap - len(self.first_ok), np.inf)])
        self.first_any = np.concatenate([self.first_any, np.full(cap - len(self.first_any), np.inf)])

    def add(self, pid: str, vector: np.ndarray, key: str, step: int, index: int, uid: str, reward: float | None,
            content_chars: int) -> None:
        if uid in self.uids:
            return
        i = self.pos.get(pid)
        if i is None:
            i = len(self.pids)
            if i >= len(self.mat):
                self._grow()
            self.pids.append(pid)
            self.pos[pid] = i
            self.mat[i] = vector
            self.keys[i] = np.uint64(int(key, 16))
            self.rows[pid] = []
        row = _Row(int(step), int(index), uid, reward is not None and reward > 0, content_chars > 0)
        self.rows[pid].append(row)
        self.uids.add(uid)
        if row.nonempty:
            self.first_any[i] = min(self.first_any[i], row.step)
            if row.success:
                self.first_ok[i] = min(self.first_ok[i], row.step)


# ------------------------------------------------------------------------------------------------- pool
class ExperiencePool:
    """Experience pool of one run in a (possibly shared) LanceDB database.

    >>> pool = ExperiencePool("runs/x/pool", run_id="x")                          # doctest: +SKIP
    >>> report = pool.write_step(0, [RolloutRecord(...), ...], lessons=[...])     # doctest: +SKIP
    >>> old = pool.open_at(report.version)                                        # doctest: +SKIP
    """

    def __init__(self, uri: str | os.PathLike, run_id: str, *, embedder: Any = None,
                 embedding_model: str = BUNDLED_EMBEDDER, max_response_chars: int = 8000,
                 max_problem_chars: int = 8000, optimize_every: int = 20, embed_batch_size: int = 64,
                 read_only: bool = False, _version: int | None = None) -> None:
        import lancedb

        if not isinstance(run_id, str) or not run_id.strip():
            raise PoolError("run_id must be a non-empty string")
        self.uri = str(uri)
        self.run_id = run_id
        self.embedding_model = embedding_model
        self.max_response_chars = int(max_response_chars)
        self.max_problem_chars = int(max_problem_chars)
        self.optimize_every = int(optimize_every)
        self.embed_batch_size = int(embed_batch_size)
        self.read_only = read_only or _version is not None
        self.counters: Counter = Counter()
        """Cumulative counts: refusals (`refused_<reason>`), repairs, embeddings, writes, maintenance errors."""
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        self._run_index: _RunIndex | None = None
        self._writes = 0
        self._last_embedded = 0
        self._uid_indexed = False
        if "://" not in self.uri:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        self._db = lancedb.connect(self.uri)
        self._table = self._open_table()
        if _version is not None:
            if self._table is None:
                raise PoolError(f"pool {self.uri} has no table to check out version {_version} of")
            self._table.checkout(_version)
        if self._table is not None:
            self._check_compatible(self._table.schema)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Any, run_id: str, run_dir: str | os.PathLike | None = None,
                    embedder: Any = None) -> "ExperiencePool":
        """Open the pool described by a `PoolConfig` (uri None: `<run_dir>/pool`)."""
        uri = cfg.uri
        if uri is None:
            if run_dir is None:
                raise PoolError("pool.uri is not set: pass run_dir so the pool goes to <run dir>/pool")
            uri = str(Path(run_dir) / "pool")
        return cls(uri, run_id, embedder=embedder, embedding_model=cfg.embedding_model,
                   max_response_chars=cfg.max_response_chars, max_problem_chars=cfg.max_problem_chars,
                   optimize_every=cfg.optimize_every, embed_batch_size=cfg.embed_batch_size)

    def _open_table(self):
        try:
            names = self._db.list_tables()
            names = getattr(names, "tables", names)
        except AttributeError:  # pragma: no cover - older lancedb
            names = self._db.table_names()
        if TABLE_NAME not in list(names):
            return None
        folder = Path(self.uri) / f"{TABLE_NAME}.lance"
        if folder.is_dir() and not any((folder / "_versions").glob("*.manifest")):
            # the table's creation never committed (e.g. the disk filled up): there is nothing in it to lose
            if self.read_only:
                return None
            log.warning("pool %s: table folder without a committed version (an interrupted first write); "
                        "removing it so the step can write again", folder)
            import shutil

            shutil.rmtree(folder)
            return None
        return self._db.open_table(TABLE_NAME)

    def _check_compatible(self, schema: pa.Schema) -> None:
        meta = schema.metadata or {}
        stored = meta.get(_META_MODEL, b"").decode() or None
        if stored is not None and stored != self.embedding_model:
            raise PoolError(f"pool {self.uri} was written with embedding model '{stored}', this run uses "
                            f"'{self.embedding_model}': similarities would not be comparable")

    def open_at(self, version: int) -> "ExperiencePool":
        """A read-only view of this run's pool as it was at `version` (a `WriteReport.version`)."""
        view = ExperiencePool(self.uri, self.run_id, embedder=self._embedder, embedding_model=self.embedding_model,
                              max_response_chars=self.max_response_chars, max_problem_chars=self.max_problem_chars,
                              _version=int(version))
        view._vectors = self._vectors  # the cache is keyed by problem, valid for every version
        return view

    # ---------------------------------------------------------------------------------------- basics
    @property
    def version(self) -> int:
        """Current table version (0 before the first write)."""
        return int(self._table.version) if self._table is not None else 0

    def versions(self) -> list[int]:
        """Every version still on disk, oldest first."""
        if self._table is None:
            return []
        return sorted(int(v["version"]) for v in self._table.list_versions())

    @property
    def table(self):
        """The underlying LanceDB table (None before the first write)."""
        return self._table

    def _run_filter(self) -> str:
        return f"run_id = {sql_str(self.run_id)}"

    def count(self, kind: str | None = None, step: int | None = None, all_runs: bool = False) -> int:
        """Rows of this run (or of every run), optionally of one kind (`lesson` counts lesson sets) or step."""
        if self._table is None:
            return 0
        parts = [] if all_runs else [self._run_filter()]
        if kind is not None:
            parts.append(f"kind = {sql_str(kind)}")
        elif not all_runs:
            parts.append(f"kind != {sql_str(LESSON_KIND)}")
        if step is not None:
            parts.append(f"step = {int(step)}")
        return int(self._table.count_rows(" AND ".join(parts) if parts else None))

    # ------------------------------------------------------------------------------------ embeddings
    @property
    def embedder(self):
        if self._embedder is None:
            from .models import load_embedder

            self._embedder = load_embedder(self.embedding_model)
        return self._embedder

    def remember_embeddings(self, vectors: Mapping[str, Sequence[float]]) -> None:
        """Seed the per-problem embedding cache (e.g. vectors computed elsewhere with the same model)."""
        for pid, vec in vectors.items():
            self._vectors[pid] = self._normalise(np.asarray(vec, dtype=np.float32))

    @staticmethod
    def _normalise(vec: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(vec))
        return (vec / norm).astype(np.float32) if norm > 0 else vec.astype(np.float32)

    def _stored_vectors(self, problem_ids: Sequence[str]) -> dict[str, np.ndarray]:
        if self._table is None or not problem_ids:
            return {}
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(problem_ids), 256):
            chunk = problem_ids[start:start + 256]
            tbl = (self._table.search().where(f"problem_id IN {_sql_in(chunk)}")
                   .select(["problem_id", "vector"]).limit(None).to_arrow())
            for pid, vec in zip(tbl.column("problem_id").to_pylist(), _matrix(tbl.column("vector"))):
                if pid not in found:
                    found[pid] = vec
        return found

    def embed_problems(self, problems: Iterable[Any]) -> dict[str, np.ndarray]:
        """Vectors for problems given as `Problem`-likes (`.id`, `.question`) or `(id, text)` pairs.

        Each problem is embedded at most once: memory cache, then any stored row of that problem, then the model.
        """
        wanted: dict[str, str] = {}
        for p in problems:
            pid, text = (p if isinstance(p, tuple) else (p.id, p.question))
            wanted.setdefault(pid, text)
        missing = [pid for pid in wanted if pid not in self._vectors]
        if missing:
            self._vectors.update(self._stored_vectors(missing))
        missing = [pid for pid in wanted if pid not in self._vectors]
        if missing:
            texts = [wanted[pid] for pid in missing]
            encoded = self.embedder.encode(texts, batch_size=self.embed_batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False)
            encoded = np.asarray(encoded, dtype=np.float32)
            for pid, vec in zip(missing, encoded):
                self._vectors[pid] = self._normalise(vec)
            self.counters["embedded"] += len(missing)
            self._last_embedded = len(missing)
        else:
            self._last_embedded = 0
        return {pid: self._vectors[pid] for pid in wanted}

    def embedding(self, problem_id: str, problem_text: str) -> np.ndarray:
        return self.embed_problems([(problem_id, problem_text)])[problem_id]

    # ------------------------------------------------------------------------------------------ writes
    def _writable(self) -> None:
        if self.read_only:
            raise PoolError("this pool view is read-only (opened at a fixed version)")

    def _prepare(self, rec: RolloutRecord, step: int, policy_version: int | None,
                 report: WriteReport) -> tuple[dict[str, Any] | None, str | None]:
        """One validated row (without vector), or (None, reason it was refused)."""
        repaired: list[str] = []
        pid = _text(rec.problem_id, "RolloutRecord.problem_id")
        if not pid.strip():
            return None, "empty_problem_id"
        text = _text(rec.problem_text, "RolloutRecord.problem_text")
        if not text.strip():
            return None, "empty_problem_text"
        if len(text) > self.max_problem_chars:
            return None, "problem_too_long"
        if rec.kind not in ROLLOUT_KINDS:
            return None, "bad_kind"
        index = _as_int(rec.rollout_index)
        if index is None or index < 0:
            return None, "bad_rollout_index"
        reward, ok = _reward(rec.reward)
        if not ok:
            return None, "bad_reward"
        tokens = [_as_int(rec.prompt_tokens), _as_int(rec.completion_tokens)]
        if any(t is None or t < 0 for t in tokens):
            return None, "bad_token_count"
        version = rec.policy_version if rec.policy_version is not None else policy_version
        version = step if version is None else _as_int(version)
        if version is None:
            return None, "bad_policy_version"
        response = _text(rec.response, "RolloutRecord.response")
        truncated = len(response) > self.max_response_chars
        if truncated:
            response = response[: self.max_response_chars]
            repaired.append("truncated_response")
        answer = None
        if rec.extracted_answer is not None:
            answer = _text(rec.extracted_answer, "RolloutRecord.extracted_answer")
            if len(answer) > MAX_ANSWER_CHARS:
                answer = answer[:MAX_ANSWER_CHARS]
                repaired.append("truncated_answer")
        context_ids = [_text(cid, "RolloutRecord.context_ids[]") for cid in rec.context_ids or ()]
        for what in repaired:
            report.repaired[what] += 1
        return {
            "uid": f"{self.run_id}/{step}/{pid}/{index}", "run_id": self.run_id, "step": step, "problem_id": pid,
            "rollout_index": index, "kind": rec.kind, "problem_text": text, "text_key": text_key(text),
            "context_ids": context_ids, "response": response, "content_chars": len(response.strip()),
            "response_truncated": truncated, "extracted_answer": answer, "reward": reward,
            "policy_version": version, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "lesson_key": None, "lessons": None, "producer": None,
        }, None

    def _lesson_row(self, lesson_set: LessonSet, step: int) -> dict[str, Any]:
        """The row of one lesson set (without vector). A malformed set is a caller bug: it raises."""
        if not isinstance(lesson_set, LessonSet):
            raise TypeError(f"lessons must be LessonSet objects, got {type(lesson_set).__name__}")
        if lesson_set.step != step:
            raise PoolError(f"LessonSet.step is {lesson_set.step!r}: only lessons made in the step being written "
                            f"({step}) are stored with it")
        sources = sorted(set(_text(u, "LessonSet.source_ids[]") for u in lesson_set.source_ids))
        lessons = [_text(x, "LessonSet.lessons[]") for x in lesson_set.lessons]
        pid = _text(lesson_set.problem_id, "LessonSet.problem_id")
        text = _text(lesson_set.problem_text, "LessonSet.problem_text")
        if not sources or not lessons or not pid.strip() or not text.strip():
            raise PoolError("a LessonSet needs non-empty source_ids, lessons, problem_id and problem_text")
        version = step if lesson_set.policy_version is None else _as_int(lesson_set.policy_version)
        if version is None:
            raise PoolError(f"LessonSet.policy_version must be an int or None, got {lesson_set.policy_version!r}")
        key = lesson_key(sources)
        body = "\n".join(lessons)
        return {
            "uid": f"{self.run_id}/lesson/{key}", "run_id": self.run_id, "step": step, "problem_id": pid,
            "rollout_index": -1, "kind": LESSON_KIND, "problem_text": text, "text_key": text_key(text),
            "context_ids": sources, "response": body, "content_chars": len(body.strip()),
            "response_truncated": False, "extracted_answer": None, "reward": None, "policy_version": version,
            "prompt_tokens": 0, "completion_tokens": 0, "lesson_key": key, "lessons": lessons,
            "producer": _text(lesson_set.producer, "LessonSet.producer"),
        }

    def _existing_uids(self, uids: Sequence[str]) -> set[str]:
        index = self._index()
        return {u for u in uids if u in index.uids} if index is not None else set()

    # ------------------------------------------------------------------------------------ run index
    def _index(self) -> _RunIndex | None:
        """The run's in-memory catalogue, built from the table on first use (None while there is no table)."""
        if self._run_index is None and self._table is not None:
            started = time.perf_counter()
            tbl = self._table.search().where(self._run_filter()).select(
                ["uid", "problem_id", "step", "rollout_index", "kind", "reward", "content_chars", "text_key",
                 "lesson_key", "lessons"]).with_row_id(True).limit(None).to_arrow()
            cols = {name: tbl.column(name).to_pylist() for name in tbl.column_names}
            kinds = cols["kind"]
            first_row: dict[str, int] = {}
            for pid, kind, rowid in zip(cols["problem_id"], kinds, cols["_rowid"]):
                if kind != LESSON_KIND and pid not in self._vectors and pid not in first_row:
                    first_row[pid] = rowid
            if first_row:
                got = self._table.take_row_ids(list(first_row.values())).select(["problem_id", "vector"]).to_arrow()
                for pid, vec in zip(got.column("problem_id").to_pylist(), _matrix(got.column("vector"))):
                    self._vectors.setdefault(pid, vec)
            index = _RunIndex(self._table.schema.field("vector").type.list_size)
            for i, kind in enumerate(kinds):
                if kind == LESSON_KIND:
                    index.lessons[cols["lesson_key"][i]] = [str(x) for x in (cols["lessons"][i] or [])]
                    continue
                pid = cols["problem_id"][i]
                index.add(pid, self._vectors[pid], cols["text_key"][i], cols["step"][i], cols["rollout_index"][i],
                          cols["uid"][i], cols["reward"][i], cols["content_chars"][i])
            self._run_index = index
            self.counters["index_loads"] += 1
            log.debug("pool %s: loaded %d rows of run %s in %.2fs", self.uri, tbl.num_rows, self.run_id,
                      time.perf_counter() - started)
        return self._run_index

    def _rows_by_uid(self, uids: Sequence[str], columns: list[str]) -> dict[str, dict[str, Any]]:
        """Full rows for a few uids (a BTREE index on `uid` makes this a lookup, not a scan)."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(uids), 256):
            chunk = list(uids[start:start + 256])
            tbl = self._table.search().where(f"uid IN {_sql_in(chunk)}").select(columns).limit(None).to_arrow()
            out.update({r["uid"]: r for r in tbl.to_pylist()})
        return out

    def write_step(self, step: int, records: Iterable[RolloutRecord | Mapping[str, Any]],
                   lessons: Sequence[LessonSet] = (), *, policy_version: int | None = None) -> WriteReport:
        """Append one training step's rollouts and its lesson sets not stored yet, as one table version.

        Rollouts already stored (same uid) and lesson sets already stored (same key) are skipped, so repeating a
        write after a crash adds nothing. Rows that fail validation are refused and counted, never raised; a
        structural error (not a record, a field of the wrong type, a malformed lesson set) raises before anything
        is written. Either way the stored pool is never changed partly.
        """
        self._writable()
        if _as_int(step) is None or step < 0:
            raise PoolError(f"step must be a non-negative integer, got {step!r}")
        started = time.perf_counter()
        report = WriteReport(step=int(step))
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for raw in records:
            rec = RolloutRecord.coerce(raw)
            row, reason = self._prepare(rec, int(step), policy_version, report)
            if reason is not None:
                report.refused[reason] += 1
                continue
            if row["uid"] in seen:
                report.refused["duplicate"] += 1
                continue
            seen.add(row["uid"])
            rows.append(row)
        existing = self._existing_uids([r["uid"] for r in rows])
        if existing:
            report.refused["duplicate"] += sum(r["uid"] in existing for r in rows)
            rows = [r for r in rows if r["uid"] not in existing]
        index = self._index()
        stored = index.lessons if index is not None else {}
        lesson_rows: dict[str, dict[str, Any]] = {}
        for lesson_set in lessons:
            row = self._lesson_row(lesson_set, int(step))
            if row["lesson_key"] not in stored:
                lesson_rows.setdefault(row["lesson_key"], row)  # the first set made for a source set wins
        all_rows = rows + list(lesson_rows.values())
        vectors = self.embed_problems([(r["problem_id"], r["problem_text"]) for r in all_rows])
        report.embedded = self._last_embedded if all_rows else 0
        if all_rows:
            for r in all_rows:
                r["vector"] = vectors[r["problem_id"]]
            data = self._to_arrow(all_rows)
            result = self._append(data)
            report.data_version = int(getattr(result, "version", 0) or self._table.version)
            report.written, report.lessons_written = len(rows), len(lesson_rows)
            index = self._run_index
            if index is None:  # the table did not exist before this write: the run has nothing else stored
                index = self._run_index = _RunIndex(int(data.schema.field("vector").type.list_size))
            for r in rows:
                index.add(r["problem_id"], r["vector"], r["text_key"], r["step"], r["rollout_index"], r["uid"],
                          r["reward"], r["content_chars"])
            for key, row in lesson_rows.items():
                index.lessons[key] = list(row["lessons"])
            self._writes += 1
            self._maintain()
        else:
            report.data_version = self.version
        report.version = self.version
        report.seconds = time.perf_counter() - started
        self.counters["steps_written"] += 1
        self.counters["rows_written"] += report.written
        self.counters["lessons_written"] += report.lessons_written
        for k, v in report.refused.items():
            self.counters[f"refused_{k}"] += v
        for k, v in report.repaired.items():
            self.counters[f"repaired_{k}"] += v
        return report

    def _to_arrow(self, rows: list[dict[str, Any]]) -> pa.Table:
        dim = int(rows[0]["vector"].shape[0])
        schema = self._table.schema if self._table is not None else _schema(dim, self.embedding_model)
        want = schema.field("vector").type.list_size
        if dim != want:
            raise PoolError(f"embedding dimension {dim} does not match the pool's {want}")
        now = datetime.now(timezone.utc)
        columns: dict[str, Any] = {}
        for name in schema.names:
            if name == "vector":
                flat = np.concatenate([np.asarray(r["vector"], dtype=np.float32).reshape(-1) for r in rows])
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
            elif name == "created_at":
                columns[name] = pa.array([now] * len(rows), type=schema.field(name).type)
            else:
                columns[name] = pa.array([r[name] for r in rows], type=schema.field(name).type)
        return pa.Table.from_pydict(columns, schema=schema)

    def _append(self, data: pa.Table | pa.RecordBatchReader):
        """The one commit of a step (separate so tests can interrupt it)."""
        if self._table is None:
            self._table = self._db.create_table(TABLE_NAME, schema=data.schema, exist_ok=True)
            self._check_compatible(self._table.schema)
        return self._table.add(data)

    # ------------------------------------------------------------------------------------- maintenance
    def _maintain(self) -> None:
        """Every `optimize_every` writes: compact small fragments and fold new rows into the uid index; create
        that index once the table is big enough. Failures (e.g. another process compacting) are logged."""
        try:
            if self.optimize_every > 0 and self._writes % self.optimize_every == 0:
                self.optimize()
            self.ensure_uid_index()
        except Exception as e:  # maintenance must never lose a step that is already committed
            self.counters["maintenance_errors"] += 1
            log.warning("pool maintenance failed (the step is stored): %s", e)

    def optimize(self) -> None:
        """Compact files and update indices; keeps every old version readable."""
        self._writable()
        if self._table is not None:
            self._table.optimize(cleanup_older_than=KEEP_VERSIONS)
            self.counters["optimized"] += 1

    def ensure_uid_index(self) -> bool:
        """BTREE index on `uid` (fetching a few rows by uid is then a lookup). True if created now."""
        self._writable()
        if self._table is None or self._uid_indexed or self._table.count_rows() < UID_INDEX_MIN_ROWS:
            return False
        if any("uid" in list(getattr(i, "columns", [])) for i in self._table.list_indices()):
            self._uid_indexed = True
            return False
        from lancedb.index import BTree

        self._table.create_index("uid", config=BTree(), replace=True)
        self._uid_indexed = True
        self.counters["uid_indexed"] += 1
        return True

    def disk_bytes(self) -> int | None:
        """Bytes on disk under a local pool folder (all versions); None for remote URIs."""
        if "://" in self.uri:
            return None
        return sum(f.stat().st_size for f in Path(self.uri).rglob("*") if f.is_file())

    # ------------------------------------------------------------------------------------------ lessons
    def get_lessons(self, source_ids: Iterable[str]) -> list[str] | None:
        """Stored lessons for exactly this set of source experience ids, else None."""
        index = self._index()
        key = lesson_key(source_ids)
        if index is not None and key in index.lessons:
            return list(index.lessons[key])
        return None

    # ----------------------------------------------------------------------------------------- queries
    def earlier_attempts(self, problem_ids: Sequence[str], max_attempts: int = 1,
                         selection: Literal["most_recent", "random"] = "most_recent", *,
                         before_step: int | None = None, seed: int = 0) -> dict[str, list[Attempt]]:
        """Earlier responses of this run to each problem, chosen without looking at rewards.

        `most_recent`: the latest step first, and inside a step the lowest rollout index first. `random`: uniform
        over all earlier attempts, with an RNG seeded by (seed, problem, before_step). Empty responses are never
        returned. Only step, rollout index and emptiness are looked at, and the attempts carry no reward.
        """
        out: dict[str, list[Attempt]] = {pid: [] for pid in problem_ids}
        if selection not in ("most_recent", "random"):
            raise PoolError(f"unknown selection '{selection}' (most_recent or random)")
        index = self._index()
        if index is None or max_attempts < 1:
            return out
        order: dict[str, list[str]] = {}
        for pid in out:
            rows = [r for r in index.rows.get(pid, ()) if r.nonempty and (before_step is None or r.step < before_step)]
            if selection == "most_recent":
                rows.sort(key=lambda r: (-r.step, r.index))
                picked = rows[:max_attempts]
            else:
                rows.sort(key=lambda r: (r.step, r.index))
                picked = random.Random(f"{seed}|{pid}|{before_step}").sample(rows, min(max_attempts, len(rows)))
            order[pid] = [r.uid for r in picked]
        wanted = [u for uids in order.values() for u in uids]
        if not wanted:
            return out
        full = self._rows_by_uid(wanted, _ATTEMPT_COLUMNS)
        for pid, uids in order.items():
            out[pid] = [Attempt(**full[u]) for u in uids if u in full]
        return out

    def rewards_of(self, uids: Sequence[str]) -> dict[str, float | None]:
        """Stored rewards by uid. Only `lanpo.failure_control: leak_correctness` reads them for a reflection
        context: showing them is the leak that control makes on purpose (reflection itself never looks)."""
        return {u: r["reward"] for u, r in self._rows_by_uid(list(uids), ["uid", "reward"]).items()}

    def similar_experiences(self, problem_id: str, problem_text: str, *, top_k: int = 4,
                            min_similarity: float | None = 0.6, duplicate_similarity: float = 0.9,
                            successful_only: bool = True,
                            source_choice: Literal["earliest", "latest"] = "earliest",
                            before_step: int | None = None) -> list[Experience]:
        """Top-k experiences of *other* problems of this run, most similar problem first, one per problem.

        Excluded: the same problem id, identical normalised text, cosine >= `duplicate_similarity`, cosine <
        `min_similarity` (None: no threshold), empty responses, and with `successful_only` rows whose reward is not
        > 0. The shown rollout of a problem is its earliest (or latest) eligible one. Cosines are exact.
        """
        if self._table is None or top_k < 1:
            return []
        index = self._index()
        n = len(index.pids)
        if n == 0:
            return []
        query = self.embedding(problem_id, problem_text)
        # einsum, not `@`: OpenBLAS's threads fight LanceDB's runtime threads here (docs/defaults.md)
        sims = np.einsum("ij,j->i", index.mat[:n], query)
        ready = index.first_ok[:n] if successful_only else index.first_any[:n]
        mask = (ready < (np.inf if before_step is None else before_step)) & (sims < duplicate_similarity)
        mask &= index.keys[:n] != np.uint64(int(text_key(problem_text), 16))
        if min_similarity is not None:
            mask &= sims >= min_similarity
        if problem_id in index.pos:
            mask[index.pos[problem_id]] = False
        cand = np.nonzero(mask)[0]
        if len(cand) > 8 * top_k:
            cand = cand[np.argpartition(-sims[cand], 8 * top_k - 1)[:8 * top_k]]
        ranked = sorted(cand.tolist(), key=lambda i: (-float(sims[i]), index.pids[i]))[:top_k]
        chosen: list[tuple[str, float, str]] = []
        for i in ranked:
            pid = index.pids[i]
            rows = [r for r in index.rows[pid] if r.nonempty and (r.success or not successful_only)
                    and (before_step is None or r.step < before_step)]
            pick = (min if source_choice == "earliest" else max)(rows, key=lambda r: (r.step, r.index))
            chosen.append((pid, float(sims[i]), pick.uid))
        full = self._rows_by_uid([uid for _, _, uid in chosen], _EXPERIENCE_COLUMNS)
        return [Experience(**full[uid], similarity=sim) for _, sim, uid in chosen if uid in full]

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Counts and reward/tokens summaries of this run, plus table-level facts."""
        out: dict[str, Any] = {"version": self.version, "run_id": self.run_id, "rows": 0, "lessons": 0,
                               "problems": 0, "steps": 0, "by_kind": {}, "prompt_tokens": 0,
                               "completion_tokens": 0, "rows_all_runs": 0, "runs": 0,
                               "counters": dict(self.counters)}
        if self._table is None:
            return out
        tbl = self._table.search().where(self._run_filter()).select(
            ["kind", "problem_id", "step", "reward", "prompt_tokens", "completion_tokens"]).limit(None).to_arrow()
        kinds = np.asarray(tbl.column("kind").to_pylist(), dtype=object)
        rollout = kinds != LESSON_KIND
        rewards = np.asarray([np.nan if r is None else r for r in tbl.column("reward").to_pylist()], dtype=float)
        out["rows"] = int(rollout.sum())
        out["lessons"] = int((~rollout).sum())
        out["problems"] = len(set(np.asarray(tbl.column("problem_id").to_pylist(), dtype=object)[rollout]))
        out["steps"] = len(set(np.asarray(tbl.column("step").to_pylist())[rollout].tolist()))
        for name in ("prompt_tokens", "completion_tokens"):
            out[name] = int(np.asarray(tbl.column(name).to_pylist(), dtype=np.int64)[rollout].sum())
        for kind in ROLLOUT_KINDS:
            mask = kinds == kind
            r = rewards[mask]
            scored = r[~np.isnan(r)]
            out["by_kind"][kind] = {"rows": int(mask.sum()),
                                    "reward_mean": float(scored.mean()) if scored.size else None,
                                    "success_rate": float((scored > 0).mean()) if scored.size else None}
        out["rows_all_runs"] = int(self._table.count_rows())
        runs = self._table.search().select(["run_id"]).limit(None).to_arrow().column("run_id").unique()
        out["runs"] = len(runs)
        return out

    def __repr__(self) -> str:
        return f"ExperiencePool(uri={self.uri!r}, run_id={self.run_id!r}, version={self.version})"
