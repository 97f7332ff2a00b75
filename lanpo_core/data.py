"""Problem sets: loaders for the benchmark formats, a procedural arithmetic generator, and load reports.

Every loader returns a `ProblemSet`: the problems plus a `LoadReport` that counts what was read, what was
skipped and why (missing gold answer, duplicate id), with line numbers. Nothing is dropped silently; a row
that cannot be read at all (bad JSON, not an object) stops the load with the file and line in the message.

A problem's id is a content hash of its source label and normalised question, so it is stable across runs,
machines and file re-orderings: the experience pool keys on it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import ArithmeticConfig, DatasetConfig
from .verify import gsm8k_gold, last_boxed

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or dataset could not be read. The message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class Problem:
    id: str
    """Content hash of source + normalised question (16 hex chars)."""
    question: str
    """Problem text as shown to the model."""
    answer: str
    """Gold answer (a string math-verify can parse: a number, LaTeX expression, set, interval...)."""
    source: str
    """Dataset label, e.g. `gsm8k-train`, `arithmetic-heldout`."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Anything else worth keeping (source id, subject, level, reference solution, file line)."""


def normalize_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def problem_id(source: str, question: str) -> str:
    return hashlib.sha256(f"{source}\n{normalize_question(question)}".encode()).hexdigest()[:16]


@dataclass
class LoadReport:
    source: str
    """Dataset label."""
    origin: str
    """File path or hub name."""
    rows: int = 0
    """Rows read."""
    missing_gold: list[int] = field(default_factory=list)
    """Lines (1-based; rows for tables) skipped because the gold answer is missing or empty."""
    duplicates: list[int] = field(default_factory=list)
    """Lines skipped because an earlier row has the same id (same normalised question)."""

    @property
    def skipped(self) -> int:
        return len(self.missing_gold) + len(self.duplicates)

    def warnings(self) -> list[str]:
        out = []
        for what, lines in (("no gold answer", self.missing_gold), ("duplicate question", self.duplicates)):
            if lines:
                shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
                out.append(f"{self.origin}: skipped {len(lines)} row(s) with {what} (lines {shown})")
        return out


@dataclass
class ProblemSet:
    name: str
    problems: list[Problem]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


# ------------------------------------------------------------------------------------------------ paths
def shared_data_dir() -> Path:
    """The shared benchmark folder: env LANPO_SHARED_DATA, else `../shared/data` next to the repository."""
    env = os.environ.get("LANPO_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_path(path: str, base_dir: str | Path | None = None) -> Path:
    """Expand `${shared}` and `~`; resolve relative paths against `base_dir` (the config's folder), then cwd."""
    expanded = Path(os.path.expanduser(path.replace("${shared}", str(shared_data_dir()))))
    if expanded.is_absolute():
        return expanded
    if base_dir is not None and (Path(base_dir) / expanded).exists():
        return Path(base_dir) / expanded
    return Path.cwd() / expanded


# ----------------------------------------------------------------------------------------------- readers
def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from read_jsonl(path)
        return
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    import pandas as pd

    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            first = 2  # line 1 is the header
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            first = 1
        else:
            raise DataError(f"{path}: unknown table format '{suffix}'; expected .jsonl, .csv or .parquet")
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow errors are long; keep the first line
        raise DataError(f"{path}: could not read as {suffix[1:]} ({str(e).splitlines()[0]})") from None
    for offset, row in enumerate(frame.to_dict(orient="records")):
        yield first + offset, row


def _text(value: Any) -> str:
    """Gold answers arrive as strings, ints or floats (AMC's `27.0`): make them strings without a spurious `.0`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _field(row: dict[str, Any], names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise DataError(f"{where}: no field {' or '.join(repr(n) for n in names)} (fields: {', '.join(row)})")


def _build(spec: DatasetConfig, label: str, origin: str,
           rows: Iterator[tuple[int, str, str, dict[str, Any]]]) -> ProblemSet:
    """Turn (line, question, gold, metadata) rows into a ProblemSet, reporting skips."""
    report = LoadReport(source=label, origin=origin)
    problems: list[Problem] = []
    seen: set[str] = set()
    for line, question, gold, meta in rows:
        report.rows += 1
        if not question.strip():
            raise DataError(f"{origin}:{line}: empty question")
        if not gold:
            report.missing_gold.append(line)
            continue
        pid = problem_id(label, question)
        if pid in seen:
            report.duplicates.append(line)
            continue
        seen.add(pid)
        problems.append(Problem(pid, question.strip(), gold, label, {"line": line, **meta}))
    if report.rows == 0:
        raise DataError(f"{origin}: no rows (empty file or dataset)")
    if not problems:
        raise DataError(f"{origin}: none of {report.rows} rows is usable; " + "; ".join(report.warnings()))
    for warning in report.warnings():
        log.warning(warning)
    if spec.shuffle:
        random.Random(spec.seed).shuffle(problems)
    if spec.limit is not None:
        problems = problems[: spec.limit]
    return ProblemSet(label, problems, report)


def _default_label(spec: DatasetConfig) -> str:
    if spec.name:
        return spec.name
    if spec.format == "arithmetic":
        return f"arithmetic-{spec.split}"
    if spec.format == "hf":
        return f"{spec.hf_name}-{spec.split}".replace("/", "-")
    path = Path(spec.path or "")
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def load_problems(spec: DatasetConfig, base_dir: str | Path | None = None) -> ProblemSet:
    """Load one dataset as described by a `DatasetConfig` (see its field docs for the formats)."""
    label = _default_label(spec)
    if spec.format == "arithmetic":
        return generate_arithmetic(spec.arithmetic, spec.split, spec.size, label)
    if spec.format == "hf":
        return _load_hf(spec, label)
    assert spec.path is not None  # enforced by DatasetConfig
    path = resolve_path(spec.path, base_dir)
    origin = str(path)

    def rows() -> Iterator[tuple[int, str, str, dict[str, Any]]]:
        source = read_jsonl(path) if spec.format != "table" else _table_rows(path)
        for line, row in source:
            where = f"{origin}:{line}"
            if spec.format == "gsm8k":
                question = _text(_field(row, ("question",), where))
                gold = gsm8k_gold(_text(_field(row, ("answer",), where))) or ""
                yield line, question, gold, {"solution": row.get("answer")}
            elif spec.format == "math":
                question = _text(_field(row, ("problem", "question"), where))
                gold = _text(row.get("answer")) or (last_boxed(_text(row.get("solution"))) or "")
                meta = {k: row[k] for k in ("subject", "level", "unique_id", "solution") if k in row}
                yield line, question, gold, meta
            elif spec.format == "competition":
                question = _text(_field(row, ("problem", "question"), where))
                gold = _text(_field(row, ("answer",), where))
                meta = {k: row[k] for k in ("id", "url", "solution") if k in row}
                yield line, question, gold, meta
            else:  # table
                question = _text(_field(row, (spec.question_field,), where))
                gold = _gold_from_style(_text(_field(row, (spec.answer_field,), where)), spec.answer_style)
                meta = {"source_id": row[spec.id_field]} if spec.id_field and spec.id_field in row else {}
                yield line, question, gold, meta

    return _build(spec, label, origin, rows())


def _gold_from_style(raw: str, style: str) -> str:
    if style == "gsm8k":
        return gsm8k_gold(raw) or ""
    if style == "boxed":
        return last_boxed(raw) or ""
    return raw


def _load_hf(spec: DatasetConfig, label: str) -> ProblemSet:
    origin = f"hf:{spec.hf_name}" + (f"/{spec.hf_config}" if spec.hf_config else "") + f"[{spec.split}]"
    try:
        import datasets

        dataset = datasets.load_dataset(spec.hf_name, spec.hf_config, split=spec.split)
    except Exception as e:  # hub errors come in many types (ConnectionError, OfflineModeIsEnabled, ...)
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true") or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        reason = "hub access is disabled (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load dataset {origin}: {reason}, or the name/config/split does not exist ({first}). "
            "On machines without hub access use a local file (format: gsm8k, math, competition or table)."
        ) from None

    def rows() -> Iterator[tuple[int, str, str, dict[str, Any]]]:
        for index, row in enumerate(dataset, start=1):
            where = f"{origin} row {index}"
            question = _text(_field(row, (spec.question_field,), where))
            gold = _gold_from_style(_text(_field(row, (spec.answer_field,), where)), spec.answer_style)
            meta = {"source_id": row[spec.id_field]} if spec.id_field and spec.id_field in row else {}
            yield index, question, gold, meta

    return _build(spec, label, origin, rows())


# ------------------------------------------------------------------------------------ arithmetic generator
def _operand_range(digits: int) -> range:
    return range(0, 10) if digits == 1 else range(10 ** (digits - 1), 10**digits)


def _is_heldout(question: str, cfg: ArithmeticConfig) -> bool:
    """Split by a hash of the question, so train and held-out never share one, whatever `size` asks for."""
    digest = hashlib.sha256(f"{cfg.seed}|{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.heldout_fraction


def _arithmetic_item(a: int, op: str, b: int, cfg: ArithmeticConfig) -> tuple[str, int]:
    if op == "-" and not cfg.allow_negative and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    shown = "×" if op == "*" else op
    return f"What is {a} {shown} {b}?", value


def _chain_item(terms: tuple[int, ...], ops: tuple[str, ...], cfg: ArithmeticConfig) -> tuple[str, int] | None:
    """`operand_ranges` questions: the operands in order, `*` before `+`/`-`; None if the result is negative and
    negatives are not allowed (swapping operands would change the digit pattern the family is defined by)."""
    sums, product = [], terms[0]
    signs = [1]
    for op, x in zip(ops, terms[1:]):
        if op == "*":
            product *= x
        else:
            sums.append(signs[-1] * product)
            signs.append(1 if op == "+" else -1)
            product = x
    value = sum(sums) + signs[-1] * product
    if value < 0 and not cfg.allow_negative:
        return None
    shown = [("×" if op == "*" else op) for op in ops]
    text = " ".join(f"{t} {o}" for t, o in zip(terms, shown)) + f" {terms[-1]}"
    return f"What is {text}?", value


def _candidates(cfg: ArithmeticConfig) -> tuple[int, Callable[[random.Random], tuple[str, int] | None],
                                                  Callable[[], Iterator[tuple[str, int] | None]]]:
    """(size of the question space, draw one at random, enumerate all) for the generator's family."""
    if cfg.operand_ranges:
        ranges = [range(lo, hi + 1) for lo, hi in cfg.operand_ranges]
        gaps = len(ranges) - 1
        space = math.prod(len(r) for r in ranges) * len(cfg.operations) ** gaps

        def draw(rng: random.Random) -> tuple[str, int] | None:
            return _chain_item(tuple(rng.choice(r) for r in ranges),
                               tuple(rng.choice(cfg.operations) for _ in range(gaps)), cfg)

        def every() -> Iterator[tuple[str, int] | None]:
            for ops in itertools.product(cfg.operations, repeat=gaps):
                for terms in itertools.product(*ranges):
                    yield _chain_item(terms, ops, cfg)
        return space, draw, every
    operands = [n for d in range(cfg.min_digits, cfg.max_digits + 1) for n in _operand_range(d)]

    def draw_pair(rng: random.Random) -> tuple[str, int]:
        a, b, op = rng.choice(operands), rng.choice(operands), rng.choice(cfg.operations)
        return _arithmetic_item(a, op, b, cfg)

    def every_pair() -> Iterator[tuple[str, int]]:
        for op in cfg.operations:
            for a in operands:
                for b in operands:
                    yield _arithmetic_item(a, op, b, cfg)
    return len(operands) ** 2 * len(cfg.operations), draw_pair, every_pair


def generate_arithmetic(cfg: ArithmeticConfig, split: str, size: int, label: str | None = None) -> ProblemSet:
    """Draw `size` distinct problems of one split ("train" or "heldout").

    The question space is every (a, op, b) with operands of `min_digits`..`max_digits` digits, or every chain of
    operands drawn from `operand_ranges`. Small spaces are enumerated (1-digit sums: 100 questions, so
    `size` is capped by what the split holds); large ones sampled.
    """
    label = label or f"arithmetic-{split}"
    want_heldout = split == "heldout"
    space, draw, every = _candidates(cfg)
    rng = random.Random(f"{cfg.seed}|{split}")
    chosen: dict[str, int] = {}
    if space <= 200_000:
        candidates = list(every())
        rng.shuffle(candidates)
        for item in candidates:
            if item is None:
                continue
            question, value = item
            if question not in chosen and _is_heldout(question, cfg) == want_heldout:
                chosen[question] = value
                if len(chosen) == size:
                    break
    else:
        attempts = 0
        while len(chosen) < size and attempts < size * 50:
            attempts += 1
            item = draw(rng)
            if item is not None and _is_heldout(item[0], cfg) == want_heldout:
                chosen.setdefault(*item)
    if len(chosen) < size:
        log.info("%s: the question space holds %d distinct %s problems; asked for %d", label, len(chosen), split, size)
    problems = [
        Problem(problem_id(label, q), q, str(v), label, {"generator": cfg.model_dump(), "index": i})
        for i, (q, v) in enumerate(chosen.items())
    ]
    report = LoadReport(source=label, origin=f"generated ({space} possible questions)", rows=len(problems))
    return ProblemSet(label, problems, report)
