"""Answer extraction and verification (METHOD.md step 6).

`extract_answer` pulls the final answer out of a response, trying the configured extractors in order:

- `boxed`: the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included;
- `hashes`: the last `#### X` line (GSM8K style);
- `answer_is`: the last "the (final) answer is X";
- `last_number`: the last number in the text (integers, decimals, `a/b`, `\\frac{a}{b}`, thousands commas).

After `####` and "the answer is", the answer is the math expression the text starts with (numbers, single-letter
variables, operators, brackets, LaTeX; inside `$...$` if delimited), cut at the first word, sentence end or
", " before a word: "9, because ..." is `9`, "3 dollars" is `3`, "x^2 + 1 for all x" is `x^2 + 1`. Trailing
punctuation is never part of an answer; a comma is part of a number only between groups of three digits.

The fallbacks exist because small models rarely write `\\boxed{N}` (stack.md §2); a run that wants the strict
format sets `verify.extraction: [boxed]`.

`Verifier` compares the extracted answer with the gold answer through math-verify (numbers, fractions, LaTeX
expressions, sets, intervals). Rules: a gold answer math-verify cannot parse is a skip (`reward=None`,
status `gold_unparsable`) whatever the response, answered or not, never a 1 or a 0; otherwise no extracted answer
is `no_answer` (0) and an answer that cannot be parsed is `wrong` (0).

Timeouts: math-verify's own timeout uses `signal.alarm`, which only works in a process's main thread (Prefect
runs tasks in worker threads) and cannot interrupt C code. So parsing and comparison run in one long-lived
child process per `Verifier`; the parent waits for each item's answer at most `timeout_seconds`, and when an
item overruns, kills the child (SIGKILL: nothing survives), scores the item `timeout` (reward 0) and starts
a fresh child for the rest of the batch. A gold answer whose parse overruns is unusable (`gold_unparsable`). A
timeout is counted, never fatal.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import re
import weakref
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Iterable, Literal, Sequence

Status = Literal["correct", "wrong", "no_answer", "gold_unparsable", "timeout"]
STATUSES: tuple[Status, ...] = ("correct", "wrong", "no_answer", "gold_unparsable", "timeout")
EXTRACTORS = ("boxed", "hashes", "answer_is", "last_number")
STARTUP_TIMEOUT = 60.0
"""Seconds the verification child may take to import math-verify (about 1 s here)."""


# ------------------------------------------------------------------------------------------- extraction
def boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every `\\boxed{...}`/`\\fbox{...}` (nested braces balanced; an unclosed one
    is skipped) or of the token after a brace-less `\\boxed X`."""
    spans = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if match.group(1) is None:  # `\boxed 5`
            rest = re.match(r"\s*([^\s$]+)", text[match.end():])
            if rest:
                spans.append((match.end() + rest.start(1), match.end() + rest.end(1)))
            continue
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    spans.append((start, i))
                    break
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`/`\\fbox{...}`, or of `\\boxed X` without braces."""
    spans = boxed_spans(text)
    return text[spans[-1][0]:spans[-1][1]].strip() if spans else None


# A number as written in a response: a LaTeX fraction, an integer with thousands separators (commas only between
# groups of three, so the comma of "9, I think" or "1,234, done" is never part of it), a plain or decimal number,
# optionally `a/b`.
_NUMBER = (r"-?\\[dt]?frac\{-?\d+\}\{\d+\}|-?\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|"
           r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_TAIL_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<open>\\\{|[(\[])|(?P<close>\\\}|[)\]])|(?P<cmd>\\[A-Za-z]+|\\[!,;: ])|"
    r"(?P<num>-?\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+)|(?P<var>[A-Za-z](?![A-Za-z]))|"
    r"(?P<op>[-+*/^_=<>|!'])|(?P<punct>[.,;:])"
)


def _math_prefix(text: str) -> str:
    """The short math expression `text` starts with: numbers, single-letter variables, operators, brackets and
    LaTeX (brace groups whole), up to the first word, sentence end, or ", " before a word ("9, because ...")."""
    i, depth, last = 0, 0, None  # last: kind of the previous non-space token
    while i < len(text):
        if text[i] == "{":  # a LaTeX argument: taken whole, words included (`\text{ cm}`)
            level = 0
            for j in range(i, len(text)):
                level += {"{": 1, "}": -1}.get(text[j], 0)
                if level == 0:
                    break
            if level:
                break
            i, last = j + 1, "close"
            continue
        m = _TAIL_TOKEN.match(text, i)
        if m is None:
            break
        kind, after = m.lastgroup, text[m.end():]
        if kind == "punct" and depth == 0:
            if m.group() != "," and (not after or after[0].isspace()):
                break  # ". " ends the sentence
            if m.group() == "," and re.match(r"\s*[A-Za-z]", after):
                break
        if kind == "var" and last in ("num", "var", "close") and text[i - 1].isspace():
            break  # "9 I think", "12 m": a letter after a complete value is prose or a unit
        if kind == "open":
            depth += 1
        elif kind == "close":
            depth = max(depth - 1, 0)
        if kind != "space":
            last = kind
        i = m.end()
    return text[:i].rstrip().rstrip(".,;:").rstrip()


def _clean_tail(answer: str) -> str:
    """The answer in the text after "the answer is" / `####`: its leading math expression, else the line."""
    line = answer.strip().splitlines()[0].strip() if answer.strip() else ""
    delimited = re.match(r"\$\$?(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", line)
    body = next(g for g in delimited.groups() if g is not None) if delimited else line.lstrip("$")
    prefix = _math_prefix(body.strip())
    if re.search(r"[A-Za-z0-9\\]", prefix):
        return prefix
    # No math to cut at ("The answer is Evelyn."): the line as written.
    line = line.rstrip(".").strip().strip("$").strip()
    return re.sub(r"^\\\(|\\\)$", "", line).strip()


def extract_answer(text: str, extraction: Sequence[str] = EXTRACTORS) -> tuple[str | None, str | None]:
    """Return (answer, extractor name) from the first extractor that finds something, else (None, None)."""
    if not text:
        return None, None
    for name in extraction:
        answer: str | None = None
        if name == "boxed":
            answer = last_boxed(text)
        elif name == "hashes":
            found = re.findall(r"####\s*(.+)", text)
            answer = _clean_tail(found[-1]) if found else None
        elif name == "answer_is":
            found = _ANSWER_IS.findall(text)
            if found:
                inner = last_boxed(found[-1])
                answer = inner if inner is not None else _clean_tail(found[-1])
        elif name == "last_number":
            found = re.findall(_NUMBER, text)
            answer = found[-1].replace(" ", "") if found else None
        else:
            raise ValueError(f"unknown extractor '{name}'; expected one of {', '.join(EXTRACTORS)}")
        if answer:
            return answer, name
    return None, None


def gsm8k_gold(answer_field: str) -> str | None:
    """Gold answer of a GSM8K solution: the text after the last `####`, thousands commas removed."""
    found = re.findall(r"####\s*(.+)", answer_field)
    if not found:
        return None
    gold = found[-1].strip().replace(",", "")
    return gold or None


# ------------------------------------------------------------------------------------------ normaliser
def numeric_value(text: str) -> Fraction | None:
    """Exact value of a plain number (`7`, `-3.50`, `1,234`, `3/4`, `\\frac{3}{4}`, `27.0`), else None."""
    s = text.strip().strip("$").strip()
    s = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    s = re.sub(r"\\!|\\,|\\ |\s", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if re.fullmatch(r"-?\d+/\d+", s):
            num, den = s.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def normalize_answer(text: str) -> str:
    """Canonical string of an answer: numbers as reduced fractions/integers, LaTeX spacing and wrappers dropped."""
    value = numeric_value(text)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return re.sub(r"\s+", "", _strip_latex_noise(text.strip().strip("$"))).rstrip(".")


def _strip_latex_noise(s: str) -> str:
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\\displaystyle", "", s)
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    return re.sub(r"\\[dt]frac", r"\\frac", s)


NUMBER_TOKEN = re.compile(r"\\[dt]?frac\{-?\d+\}\{\d+\}|(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|"
                          r"(?<![\w.])-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?(?![\d])")


def answer_in_text(gold: str, text: str) -> bool:
    """True when `text` contains the gold answer as a standalone number or expression.

    Numbers compare by value (`7` matches `7.0`, `7.00` and `\\frac{14}{2}`, not `17` or `7.5`); other answers by
    normalised text with non-alphanumeric boundaries. This is the leakage guard's test (METHOD.md step 5).
    """
    if not gold or not text:
        return False
    value = numeric_value(gold)
    if value is not None:
        for match in NUMBER_TOKEN.finditer(text):
            found = numeric_value(match.group(0).replace(" ", ""))
            if found is not None and found == value:
                return True
        return False
    needle = normalize_answer(gold)
    if not needle:
        return False
    # Same normalisation as the needle but keeping white space, then match the needle with optional white space
    # between its characters and no letter/digit on either side ("x^2+1" is in "we get x^2 + 1", not in "x^2+12").
    hay = _strip_latex_noise(text)
    pattern = r"(?<![A-Za-z0-9])" + r"\s*".join(re.escape(c) for c in needle) + r"(?![A-Za-z0-9])"
    return re.search(pattern, hay) is not None


# -------------------------------------------------------------------------------------------- verifier
@dataclass(frozen=True)
class Score:
    reward: float | None
    """1 (+ format bonus) when correct, 0 when wrong/no answer/timeout, None when the gold answer is unusable."""
    status: Status
    """correct / wrong / no_answer / gold_unparsable / timeout."""
    extracted: str | None
    """The answer string taken from the response."""
    extractor: str | None
    """Which extractor found it."""

    def as_dict(self) -> dict:
        return asdict(self)


def _wrap(answer: str) -> str:
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def _compare_one(gold: str, answer: str | None, float_rounding: int, cache: dict) -> str:
    """Runs in the child: 'correct' / 'wrong' / 'gold_unparsable'; with no answer, only the gold answer is parsed:
    'gold_ok' / 'gold_unparsable'."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    if gold not in cache:
        if len(cache) > 4096:
            cache.clear()
        cache[gold] = parse(_wrap(gold.replace(",", "") if numeric_value(gold) is not None else gold),
                            extraction_config=configs, parsing_timeout=None)
    gold_parsed = cache[gold]
    # math-verify falls back to the raw string when it understands nothing (`@@@` -> ['@@@']); comparing such
    # strings would score a garbage gold answer as matched, so a gold answer needs a real parsed expression.
    if not gold_parsed or isinstance(gold_parsed[0], str):
        return "gold_unparsable"
    if answer is None:
        return "gold_ok"
    pred = parse(_wrap(answer), extraction_config=configs, parsing_timeout=None)
    if not pred:
        return "wrong"
    ok = verify(gold_parsed, pred, float_rounding=float_rounding, timeout_seconds=None)
    return "correct" if ok else "wrong"


def _worker(read_fd: int, write_fd: int, float_rounding: int) -> None:  # pragma: no cover - child process
    import logging

    import math_verify.grader as grader
    import math_verify.parser as parser

    # We time out from the parent; silence math-verify's "you must provide the timeout yourself" warning.
    parser.TIMEOUT_WARNING_SHOWN = grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (imported before "ready" so start-up is not charged to the first item)

    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    outbox.send("ready")
    cache: dict = {}
    while True:
        try:
            items = inbox.recv()
        except EOFError:
            return
        if items is None:
            return
        for gold, answer in items:
            try:
                outbox.send(_compare_one(gold, answer, float_rounding, cache))
            except Exception:  # a parser bug on one odd string must not take the batch down
                outbox.send("wrong" if answer is not None else "gold_unparsable")


class _Child:
    """One verification child process and its two pipes.

    A plain `python -m lanpo_core.verify` subprocess rather than multiprocessing: spawn/forkserver re-import the
    caller's `__main__` (breaking scripts without a main guard), and fork is unsafe once torch threads exist.
    """

    def __init__(self, float_rounding: int) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lanpo_core.verify", str(to_child_r), str(from_child_w), str(float_rounding)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)
        if not self.inbox.poll(STARTUP_TIMEOUT) or self.inbox.recv() != "ready":
            self.kill()
            raise RuntimeError(f"the verification process did not start within {STARTUP_TIMEOUT:.0f}s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        self.outbox.close()
        self.inbox.close()


def _kill_child(holder: list) -> None:
    if holder and holder[0] is not None:
        holder[0].kill()
        holder[0] = None


class Verifier:
    """Scores responses against gold answers. Use as a context manager, or call `close()`.

    >>> with Verifier() as v:
    ...     v.score("so the sum is \\\\boxed{7}", "7").status
    'correct'
    """

    def __init__(self, extraction: Sequence[str] = EXTRACTORS, timeout_seconds: float = 5.0,
                 format_reward: float = 0.0, float_rounding: int = 6) -> None:
        unknown = [e for e in extraction if e not in EXTRACTORS]
        if unknown or not extraction:
            raise ValueError(f"verify.extraction: unknown {unknown}; expected a non-empty list of {EXTRACTORS}")
        if not timeout_seconds > 0:
            raise ValueError(f"verify.timeout_seconds must be > 0, got {timeout_seconds}")
        self.extraction = tuple(extraction)
        self.timeout_seconds = float(timeout_seconds)
        self.format_reward = float(format_reward)
        self.float_rounding = int(float_rounding)
        self.timeouts = 0
        """Overruns so far: items scored `timeout`, plus gold answers whose parse overran (their items are
        `gold_unparsable`)."""
        self._child: list = [None]
        self._finalizer = weakref.finalize(self, _kill_child, self._child)

    @classmethod
    def from_config(cls, cfg) -> "Verifier":
        """Build from a `VerifyConfig`."""
        return cls(cfg.extraction, cfg.timeout_seconds, cfg.format_reward, cfg.float_rounding)

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child process (also done when the verifier is garbage-collected or the program exits)."""
        child = self._child[0]
        if child is not None:
            try:
                child.outbox.send(None)
                child.process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _kill_child(self._child)

    @property
    def child_pid(self) -> int | None:
        child = self._child[0]
        return child.process.pid if child is not None else None

    def score(self, response: str, gold: str) -> Score:
        return self.score_batch([(response, gold)])[0]

    def score_batch(self, items: Iterable[tuple[str, str]]) -> list[Score]:
        """Score (response, gold) pairs; order is kept. Thousands of items go through one child process.

        Every distinct gold answer is parsed first, so that an unusable one (empty, unparsable, or its parse overran)
        makes each of its items a skip, answered or not: an unanswered response must not score 0 against a gold
        answer that could never have scored 1."""
        items = list(items)
        golds = [(gold or "").strip() for _response, gold in items]
        extracted = [extract_answer(response or "", self.extraction) for response, _gold in items]
        distinct = list(dict.fromkeys(g for g in golds if g))
        usable = {g for g, status in zip(distinct, self._run_all([(g, None) for g in distinct]))
                  if status == "gold_ok"}
        compare = [i for i, (g, (answer, _e)) in enumerate(zip(golds, extracted)) if g in usable and answer is not None]
        compared = dict(zip(compare, self._run_all([(golds[i], extracted[i][0]) for i in compare])))
        scores = []
        for i, (gold, (answer, extractor)) in enumerate(zip(golds, extracted)):
            if gold not in usable:
                scores.append(Score(None, "gold_unparsable", answer, extractor))
            elif answer is None:
                scores.append(Score(0.0, "no_answer", None, None))
            elif compared[i] is None:
                scores.append(Score(0.0, "timeout", answer, extractor))
            else:
                scores.append(self._make_score(compared[i], answer, extractor))
        return scores

    def _run_all(self, pairs: list[tuple[str, str | None]]) -> list[str | None]:
        """The child's verdict on every (gold, answer) pair, None for one that overran (counted in `timeouts`)."""
        out: list[str | None] = []
        while len(out) < len(pairs):
            out.extend(self._run_chunk(pairs[len(out):]))
            if len(out) < len(pairs):  # the item after the last answered one overran
                out.append(None)
                self.timeouts += 1
        return out

    def _make_score(self, status: str, answer: str, extractor: str | None) -> Score:
        if status == "gold_unparsable":
            return Score(None, "gold_unparsable", answer, extractor)
        reward = 1.0 if status == "correct" else 0.0
        if extractor == "boxed":
            reward += self.format_reward
        return Score(reward, status, answer, extractor)  # type: ignore[arg-type]

    def _run_chunk(self, pending: list[tuple[str, str | None]]) -> list[str]:
        """Send the pairs to the child; collect answers until one overruns. Returns the answered prefix."""
        if self._child[0] is None:
            self._child[0] = _Child(self.float_rounding)
        child: _Child = self._child[0]
        child.outbox.send(pending)
        answers: list[str] = []
        for _ in pending:
            if not child.inbox.poll(self.timeout_seconds):
                _kill_child(self._child)
                return answers
            try:
                answers.append(child.inbox.recv())
            except (EOFError, OSError):  # the child died (e.g. out of memory): treat like an overrun
                _kill_child(self._child)
                return answers
        return answers


def summarize(scores: Sequence[Score]) -> dict[str, float]:
    """Counts per status, accuracy over scorable items, and mean reward (metrics for a batch)."""
    counts = {status: 0 for status in STATUSES}
    for s in scores:
        counts[s.status] += 1
    scorable = [s for s in scores if s.reward is not None]
    out: dict[str, float] = {f"n_{k}": float(v) for k, v in counts.items()}
    out["n"] = float(len(scores))
    out["accuracy"] = counts["correct"] / len(scorable) if scorable else math.nan
    out["reward_mean"] = sum(s.reward for s in scorable) / len(scorable) if scorable else math.nan  # type: ignore
    return out


if __name__ == "__main__":  # the verification child (see _Child)
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
