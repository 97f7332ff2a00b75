"""Language feedback: prompt templates, reflection and abstraction contexts, lessons, and the leakage guard.

METHOD.md steps 2-5. Every prompt the pipeline sends is built here, as chat `messages` (a list of
`{"role", "content"}`; the system message only when `PromptConfig.system_prompt` is set). The rollout engine
applies the model's chat template (`render_chat` does the same for a tokenizer).

Templates (module constants below, all in one place):
  * solve: the problem, then `PromptConfig.solve_instruction`;
  * reflection: the problem, the earlier attempt(s) with their final answers hidden, a request to check them
    critically and point out possible errors, then a fresh complete solution ending in `\\boxed{}`;
  * abstraction (sent to the abstractor): retrieved experiences of other problems, asking for at most N short,
    general lessons, one per line, without numbers or answers;
  * abstraction-solve: the problem, the lessons, the solve instruction.

**The reflection / guard rule.** A correct earlier attempt contains the gold answer, so a guard that simply drops
contexts containing the gold would let only wrong attempts through, and the mere presence of a reflection context
would then tell the policy "the earlier attempt was wrong": a reward leak through selection. So, before the guard,
*every* shown attempt, whatever its reward, is transformed by a rule that looks only at the attempt's own text:

  1. its own final answers are hidden: the content of every `\\boxed{}`, every `#### X`, and every number whose
     value equals (or expression that equals) one of the attempt's own answer candidates (what each of the
     verifier's extractors finds in it, plus the stored extracted answer) becomes `[hidden]`;
  2. correctness and reward words the model may have written itself (correct, wrong, reward, ✓ ...) become
     `[redacted]`;
  3. it is cut to `reflection.max_attempt_chars` (head kept).

Then the guard audits what remains. For a correct attempt, its own answer *is* the gold, so step 1 removes every
occurrence of the gold; a wrong attempt still shows the gold only if it wrote the gold somewhere other than as its
final answer. Gold occurrences are not held against a context when the gold already appears in the problem
statement (the prompt shows the problem anyway, and step 1 removes the hint of which problem number is the answer);
without this exemption a wrong attempt at "What is 0 + 7?" that restates the problem would always be dropped while
the correct one never is. The guard's drop count therefore measures the residual leak; tests/test_feedback.py
checks that on arithmetic the drop rate is the same for correct and wrong attempts, and that permuting the stored
rewards never changes a context (the pool's attempt query does not even read rewards).

**Leakage guard** (METHOD.md step 5): it audits what the model wrote and the context shows, each part on its own:
every shown attempt (after the rule above) or every lesson. A context fails when one of them contains the
problem's gold answer as a standalone number or expression (`verify.answer_in_text`, the verifier's normaliser:
`7` matches `7.0` and `\\frac{14}{2}`), or any reward/correctness marker (`MARKER_RE`). The template's own text
(headings such as "### Earlier attempt 1", "Below are 2 earlier attempts", the instructions) is the same for every
problem and says nothing about its answer, so it is not audited: otherwise its numbers would fail every
reflection context of a problem whose gold is 1 (or 2, with two attempts). The problem statement and the solve
instruction are not audited either (the plain prompt shows them too). A failing context is dropped (the rollout
becomes plain) and counted.

**Lessons** are parsed from the abstractor's text: bullet or numbered lines (else sentences), at most N; a lesson
with a digit, a marker word, `\\boxed`, fewer than 10 or more than 300 characters is stripped (counted). The
builder never writes to the pool: lessons it makes travel in `FeedbackBatch.lesson_sets()` and are stored with the
step (`ExperiencePool.write_step(..., lessons=...)`), keyed by the source experience ids; a stored set is reused
when the same sources come back. A set that yielded no usable lesson is not kept (asked again next time).

The abstractor is any `Abstractor`: a callable taking a batch of chat messages and returning one text per
conversation. Training plugs in `engine_abstractor` (a rollout engine, greedy); tests use a fake.
`abstraction.abstractor: extractive` uses no model at all (`extractive_lessons`): the lessons are the statements
that recur, word for word, in the problem texts of at least two retrieved experiences and hold no number. It cannot
generalise a method, but it is deterministic, free, and carries a convention that related problems state and the
current one leaves out; bench/mechanism.py uses it to check the abstraction mechanism independently of how well a
tiny model summarises.

**Failure-mode controls** (`lanpo.failure_control`, off by default) break the method on purpose, for the
experiment's control arms only: `leak_correctness` shows each earlier attempt unredacted with the verifier's
verdict (naive same-problem feedback), `raw_experiences` shows retrieved experiences of other problems as they are,
without abstraction or threshold (naive other-problem feedback). For the kind it breaks, the guard only counts what
it would have dropped (`<kind>/would_drop`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .config import LanpoConfig, PromptConfig, RunConfig
from .pool import LessonSet, lesson_key
from .rollout import RolloutRequest, SamplingSpec
from .verify import EXTRACTORS, NUMBER_TOKEN, answer_in_text, boxed_spans, extract_answer, numeric_value

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Abstractor = Callable[[list[Messages]], list[str]]
"""A batch of chat conversations in, one generated text per conversation out."""

HIDDEN = "[hidden]"
"""Placeholder for an attempt's own final answer."""
SCRUBBED = "[redacted]"
"""Placeholder for a correctness/reward word the model wrote in its own attempt."""

# ------------------------------------------------------------------------------------------- templates
SOLVE_TEMPLATE = "{problem}\n\n{instruction}"

REFLECTION_TEMPLATE = (
    "{problem}\n\n"
    "{intro}\n\n"
    "{attempts}\n\n"
    "Check {target} critically: go through it step by step and point out possible errors, gaps or unjustified "
    "steps. Then write a fresh, complete solution of your own.\n"
    "{instruction}"
)
REFLECTION_INTRO_ONE = "Below is an earlier attempt at this problem. Its final answer is hidden as " + HIDDEN + "."
REFLECTION_INTRO_MANY = ("Below are {n} earlier attempts at this problem. Their final answers are hidden as "
                         + HIDDEN + ".")
REFLECTION_INTRO_LEAK = "Below are earlier attempts at this problem, each with the verifier's judgement."
ATTEMPT_TEMPLATE = "### Earlier attempt {n}\n{text}\n### End of earlier attempt {n}"

ABSTRACTION_TEMPLATE = (
    "Here are worked solutions to some problems.\n\n"
    "{experiences}\n\n"
    "Write at most {n} short, general lessons that would help with similar problems. Write each lesson as one "
    "sentence on its own line, starting with \"- \". Describe methods and checks only: do not quote any numbers, "
    "quantities or final answers from the problems above."
)
EXPERIENCE_TEMPLATE = "### Problem {n}\n{problem}\n### Solution {n}\n{response}"

# the failure-mode controls (`lanpo.failure_control`): what naive feedback would show
LEAKED_VERDICT = "The verifier judged this attempt {verdict}."
RAW_EXPERIENCES_TEMPLATE = (
    "{problem}\n\n"
    "Worked solutions to other problems:\n\n"
    "{experiences}\n\n"
    "{instruction}"
)

ABSTRACTION_SOLVE_TEMPLATE = (
    "{problem}\n\n"
    "Some general lessons from related problems:\n"
    "{lessons}\n\n"
    "{instruction}"
)

# ------------------------------------------------------------------------------------ markers, numbers
_MARKER_WORDS = (
    r"(?:in)?correct(?:ly|ness)?|wrong(?:ly)?|rewards?|rewarded|verifier|verified|ground[\s-]*truth|"
    r"gold(?:en)?\s+answers?|right\s+answers?|true\s+answers?"
)
_MARKER_SYMBOLS = "\u2713\u2714\u2717\u2718\u274c\u2705\u2611\u2612\u2715\u2716"
MARKER_RE = re.compile(
    rf"\b(?:{_MARKER_WORDS})\b|\b(?:score|accuracy|reward|correct)\s*[:=]|[{_MARKER_SYMBOLS}]", re.IGNORECASE
)
"""Reward and correctness markers: words about being right or wrong, reward/score/verifier talk, check marks."""

_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\\displaystyle")


def _messages(user: str, prompts: PromptConfig) -> Messages:
    out: Messages = []
    if prompts.system_prompt:
        out.append({"role": "system", "content": prompts.system_prompt})
    out.append({"role": "user", "content": user})
    return out


def render_chat(messages: Messages, tokenizer: Any, add_generation_prompt: bool = True) -> str:
    """The prompt string a model sees: `messages` through the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# ------------------------------------------------------------------------------------------- builders
def solve_messages(problem_text: str, prompts: PromptConfig | None = None) -> Messages:
    """The plain solve prompt (METHOD.md step 2)."""
    prompts = prompts or PromptConfig()
    return _messages(SOLVE_TEMPLATE.format(problem=problem_text, instruction=prompts.solve_instruction), prompts)


def _reflection_user(problem: str, attempts: Sequence[str], instruction: str, leaked: bool = False) -> str:
    if leaked:
        intro = REFLECTION_INTRO_LEAK
    else:
        intro = REFLECTION_INTRO_ONE if len(attempts) == 1 else REFLECTION_INTRO_MANY.format(n=len(attempts))
    blocks = "\n\n".join(ATTEMPT_TEMPLATE.format(n=i + 1, text=a) for i, a in enumerate(attempts))
    target = "the attempt" if len(attempts) == 1 else "the attempts"
    return REFLECTION_TEMPLATE.format(problem=problem, intro=intro, attempts=blocks, target=target,
                                      instruction=instruction)


def reflection_messages(problem_text: str, attempts: Sequence[str], prompts: PromptConfig | None = None,
                        leaked: bool = False) -> tuple[Messages, str]:
    """(messages, context text) for already prepared (redacted) attempts. The context text is the prompt minus the
    problem statement and the solve instruction, template headings included (for logs); the guard audits the
    attempts themselves. `leaked`: the attempts carry the verifier's verdict (`failure_control: leak_correctness`)."""
    if not attempts:
        raise ValueError("a reflection prompt needs at least one attempt")
    prompts = prompts or PromptConfig()
    user = _reflection_user(problem_text, attempts, prompts.solve_instruction, leaked)
    return _messages(user, prompts), _reflection_user("", attempts, "", leaked)


def abstraction_request_messages(experiences: Sequence[tuple[str, str]], max_lessons: int,
                                 prompts: PromptConfig | None = None, max_chars: int = 1500) -> Messages:
    """The abstractor's prompt: (problem text, response) pairs of other problems in, at most N lessons out."""
    prompts = prompts or PromptConfig()
    blocks = "\n\n".join(EXPERIENCE_TEMPLATE.format(n=i + 1, problem=p.strip(), response=r.strip()[:max_chars])
                         for i, (p, r) in enumerate(experiences))
    return _messages(ABSTRACTION_TEMPLATE.format(experiences=blocks, n=max_lessons), prompts)


def _lessons_block(lessons: Sequence[str]) -> str:
    return "\n".join(f"- {lesson}" for lesson in lessons)


def abstraction_solve_messages(problem_text: str, lessons: Sequence[str],
                               prompts: PromptConfig | None = None) -> tuple[Messages, str]:
    """(messages, context text): the problem plus lessons; the context text leaves out the problem statement and
    the solve instruction (for logs); the guard audits the lessons themselves."""
    if not lessons:
        raise ValueError("an abstraction prompt needs at least one lesson")
    prompts = prompts or PromptConfig()
    user = ABSTRACTION_SOLVE_TEMPLATE.format(problem=problem_text, lessons=_lessons_block(lessons),
                                             instruction=prompts.solve_instruction)
    context = ABSTRACTION_SOLVE_TEMPLATE.format(problem="", lessons=_lessons_block(lessons), instruction="")
    return _messages(user, prompts), context


# ------------------------------------------------------------------------------------------ redaction
def answer_candidates(text: str, stored_answer: str | None = None,
                      extraction: Sequence[str] = EXTRACTORS) -> list[str]:
    """Everything that could count as the attempt's own final answer (no gold, no reward involved)."""
    found: list[str] = []
    for name in extraction:
        answer, _ = extract_answer(text, [name])
        if answer:
            found.append(answer)
    found.extend(text[a:b].strip() for a, b in boxed_spans(text))
    found.extend(m.strip() for m in re.findall(r"####\s*(.+)", text))
    if stored_answer:
        found.append(stored_answer)
    out: list[str] = []
    for c in found:
        c = c.strip().strip("$").strip().rstrip(".").strip()
        if c and c != HIDDEN and c not in out:
            out.append(c)
    return out


def _hide_value(text: str, candidate: str) -> tuple[str, int]:
    value = numeric_value(candidate)
    if value is not None:
        count = 0

        def repl(m: re.Match) -> str:
            nonlocal count
            found = numeric_value(m.group(0).replace(" ", ""))
            if found is not None and found == value:
                count += 1
                return HIDDEN
            return m.group(0)

        return NUMBER_TOKEN.sub(repl, text), count
    needle = re.sub(r"\s+", "", _LATEX_NOISE.sub("", candidate))
    if not re.search(r"[A-Za-z0-9]", needle):  # "+", "=": nothing answer-like to hide
        return text, 0
    pattern = r"(?<![A-Za-z0-9])" + r"\s*".join(re.escape(c) for c in needle) + r"(?![A-Za-z0-9])"
    return re.subn(pattern, HIDDEN, text)


def redact_attempt(text: str, stored_answer: str | None = None,
                   extraction: Sequence[str] = EXTRACTORS) -> tuple[str, int]:
    """Hide the attempt's own final answer(s) everywhere in it; returns (text, replacements). Reward-agnostic:
    the rule looks at the attempt's text only."""
    candidates = answer_candidates(text, stored_answer, extraction)
    count = 0
    spans = boxed_spans(text)
    for a, b in reversed(spans):
        text = text[:a] + HIDDEN + text[b:]
        count += 1
    text, n = re.subn(r"(####\s*)(.+)", lambda m: m.group(1) + HIDDEN, text)
    count += n
    for cand in candidates:
        text, n = _hide_value(text, cand)
        count += n
    return text, count


def scrub_markers(text: str) -> tuple[str, int]:
    """Replace correctness/reward words and check marks (`MARKER_RE`) with a neutral placeholder."""
    return MARKER_RE.subn(SCRUBBED, text)


def prepare_attempt(response: str, stored_answer: str | None = None, *, max_chars: int = 2000,
                    redact: bool = True, extraction: Sequence[str] = EXTRACTORS) -> tuple[str, int]:
    """The reflection rule for one attempt: redact own answers, scrub markers, cut to `max_chars` (head kept)."""
    text = response.strip()
    changes = 0
    if redact:
        text, n = redact_attempt(text, stored_answer, extraction)
        changes += n
        text, n = scrub_markers(text)
        changes += n
    if len(text) > max_chars:
        text = text[:max_chars].rstrip() + " ..."
    return text, changes


# -------------------------------------------------------------------------------------------- lessons
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u00b7]|\(?\d{1,2}[.)]|lesson\s*\d*\s*[:.)-])\s*(.+?)\s*$", re.IGNORECASE)


def parse_lessons(text: str, max_lessons: int) -> tuple[list[str], int]:
    """(lessons, number stripped) from an abstractor's answer; see the module doc for the rule."""
    lines = [line.replace("**", "").replace("__", "") for line in (text or "").splitlines() if line.strip()]
    bullets = [m.group(1) for m in (_BULLET.match(line) for line in lines) if m]
    if bullets:
        items = bullets
    else:
        items = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(lines)) if s.strip()]
    lessons: list[str] = []
    stripped = 0
    for item in items:
        item = re.sub(r"\s+", " ", item).strip().strip('"').strip()
        if item.endswith(":"):
            continue
        if (re.search(r"\d", item) or MARKER_RE.search(item) or "\\boxed" in item or "####" in item
                or not 10 <= len(item) <= 300):
            stripped += 1
            continue
        if item.lower() in (x.lower() for x in lessons):
            continue
        if len(lessons) < max_lessons:
            lessons.append(item)
    return lessons, stripped


def _sentences(text: str) -> list[str]:
    """Distinct sentences in order of appearance (an ordered result keeps lessons identical across processes)."""
    found = (re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])\s+", text or ""))
    return list(dict.fromkeys(s for s in found if s))


def extractive_lessons(problem_texts: Sequence[str], max_lessons: int, known: str = "") -> list[str]:
    """Statements (not questions) found in >= 2 of the problem texts, with no digit and not already in `known` (the
    problem the lessons are for: repeating its own text teaches nothing), most frequent first."""
    seen: Counter = Counter()
    first: dict[str, int] = {}
    skip = set(_sentences(known))
    for text in problem_texts:
        for sentence in _sentences(text):
            if sentence.endswith("?") or sentence in skip or re.search(r"\d", sentence):
                continue
            seen[sentence] += 1
            first.setdefault(sentence, len(first))
    recurring = [s for s, n in seen.items() if n >= 2]
    recurring.sort(key=lambda s: (-seen[s], first[s]))
    return parse_lessons("\n".join(f"- {s}" for s in recurring), max_lessons)[0]


# ---------------------------------------------------------------------------------------------- guard
@dataclass(frozen=True)
class Audit:
    ok: bool
    reasons: tuple[str, ...] = ()
    """`gold_answer` and/or `reward_marker`."""
    gold_in_problem: bool = False
    """The gold answer appears in the problem statement, so gold occurrences were not held against the context."""


def audit_context(context: str | Sequence[str], gold: str | None, problem_text: str | None = None, *,
                  allow_gold_in_problem: bool = True) -> Audit:
    """Pure audit of one context: the text, or the parts, the model wrote (shown attempts, lessons), each on its own
    (a match never spans two parts, which the prompt shows apart)."""
    parts = [context] if isinstance(context, str) else list(context)
    reasons: list[str] = []
    gold_in_problem = bool(gold) and bool(problem_text) and answer_in_text(str(gold), problem_text or "")
    if gold and str(gold).strip() and any(answer_in_text(str(gold), part) for part in parts):
        if not (allow_gold_in_problem and gold_in_problem):
            reasons.append("gold_answer")
    if any(MARKER_RE.search(part) for part in parts):
        reasons.append("reward_marker")
    return Audit(not reasons, tuple(reasons), gold_in_problem)


def count_audit(counts: Counter, kind: str, audit: Audit) -> None:
    """Add one audit to `counts`: `<kind>/audited`, `/gold_in_problem`, `/dropped`, `/dropped_<reason>`."""
    counts[f"{kind}/audited"] += 1
    if audit.gold_in_problem:
        counts[f"{kind}/gold_in_problem"] += 1
    if not audit.ok:
        counts[f"{kind}/dropped"] += 1
        for reason in audit.reasons:
            counts[f"{kind}/dropped_{reason}"] += 1


class LeakageGuard:
    """Audits contexts and counts what it saw (`counts`, keys `<kind>/audited`, `<kind>/dropped`, ...)."""

    def __init__(self, enabled: bool = True, allow_gold_in_problem: bool = True) -> None:
        self.enabled = enabled
        self.allow_gold_in_problem = allow_gold_in_problem
        self.counts: Counter = Counter()

    def check(self, kind: str, context: str | Sequence[str], gold: str | None, problem_text: str | None) -> Audit:
        """Audit `context` (what the model wrote: the shown attempts or the lessons) for `kind`; see `audit_context`."""
        if not self.enabled:
            self.counts[f"{kind}/audited"] += 1
            return Audit(True)
        audit = audit_context(context, gold, problem_text, allow_gold_in_problem=self.allow_gold_in_problem)
        count_audit(self.counts, kind, audit)
        return audit


# ------------------------------------------------------------------------------------------- contexts
@dataclass(frozen=True)
class FeedbackContext:
    """A context that passed the guard: what the rollout engine should generate from."""

    problem_id: str
    kind: str
    """`reflection` or `abstraction`."""
    messages: Messages
    source_ids: tuple[str, ...]
    """Pool uids the context came from (store them as `RolloutRecord.context_ids`)."""
    context_text: str
    """The prompt minus the problem statement and the solve instruction, template headings included."""
    lessons: tuple[str, ...] = ()
    """Abstraction only: the lessons shown."""
    audited: tuple[str, ...] = ()
    """What the guard audited: the shown attempts (after the reflection rule), or the lessons."""


@dataclass
class FeedbackBatch:
    """Contexts for one step's problems, keyed by (problem id, kind), the lesson sets made for them, and counts."""

    contexts: dict[tuple[str, str], FeedbackContext] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    """`<kind>/built`, `<kind>/no_source`, `<kind>/dropped`, `<kind>/dropped_gold_answer`,
    `<kind>/dropped_reward_marker`, `reflection/redactions`, `abstraction/lessons_cached`,
    `abstraction/lessons_generated`, `abstraction/lessons_stripped`, `abstraction/no_lessons`,
    `abstraction/abstractor_calls`, ..."""
    new_lessons: dict[str, LessonSet] = field(default_factory=dict)
    """Lesson sets generated in this build (none read from the pool), by lesson key, in the order they were made.
    A set whose context the guard dropped is kept too: the lessons are general, other problems may reuse them."""

    def get(self, problem_id: str, kind: str) -> FeedbackContext | None:
        return self.contexts.get((problem_id, kind))

    def lesson_sets(self) -> list[LessonSet]:
        """The lesson sets to store with the step: `pool.write_step(step, records, lessons=batch.lesson_sets())`."""
        return list(self.new_lessons.values())

    def update(self, other: "FeedbackBatch") -> None:
        self.contexts.update(other.contexts)
        for key, lesson_set in other.new_lessons.items():
            self.new_lessons.setdefault(key, lesson_set)
        self.stats.update(other.stats)

    def metrics(self, prefix: str = "feedback/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in sorted(self.stats.items())}


# ----------------------------------------------------------------------------------------- abstractors
def feedback_kinds(cfg: RunConfig) -> list[str]:
    """The feedback kinds a training step builds: those the rollout mix gives at least one of the G rollouts."""
    counts = cfg.lanpo.rollout_mix.counts(cfg.rollout.num_generations)
    return [kind for kind in ("reflection", "abstraction") if counts[kind]]


class EngineAbstractor:
    """An `Abstractor` on a rollout engine: one request per conversation, greedy (the model's best summary, and
    deterministic), seeded by the step, `abstraction.max_new_tokens` long. `tokens` and `prompt_tokens` count
    what it generated and read (part of what LANPO costs over GRPO)."""

    def __init__(self, engine: Any, cfg: RunConfig, step: int) -> None:
        self.engine = engine
        self.sampling = SamplingSpec.from_config(cfg, seed=step, temperature=0.0,
                                                 max_new_tokens=cfg.lanpo.abstraction.max_new_tokens)
        self.tokens = 0
        self.prompt_tokens = 0

    def __call__(self, conversations: list[Messages]) -> list[str]:
        requests = [RolloutRequest(messages=m, n=1) for m in conversations]
        completions = self.engine.generate(requests, self.sampling)
        self.tokens += sum(len(c.completion_ids) for c in completions)
        self.prompt_tokens += sum(len(c.prompt_ids) for c in completions)
        return [c.text for c in completions]


def engine_abstractor(engine: Any, cfg: RunConfig, step: int) -> EngineAbstractor:
    """The abstractor that writes step `step`'s lessons with `engine` (the policy's or a fixed model's)."""
    return EngineAbstractor(engine, cfg, step)


class FeedbackBuilder:
    """Builds reflection and abstraction contexts for a step's problems from the pool, through the guard.

    `problems` are `data.Problem`-likes (`.id`, `.question`, `.answer`). Call `build` before generating the
    step's rollouts. The builder only reads the pool; the lesson sets it makes are in the returned batch
    (`FeedbackBatch.lesson_sets()`), to be stored with the step.
    """

    def __init__(self, pool: Any, lanpo: LanpoConfig | None = None, prompts: PromptConfig | None = None,
                 abstractor: Abstractor | None = None, *, abstractor_name: str | None = None,
                 extraction: Sequence[str] = EXTRACTORS, seed: int = 0,
                 guard: LeakageGuard | None = None) -> None:
        self.pool = pool
        self.lanpo = lanpo or LanpoConfig()
        self.prompts = prompts or PromptConfig()
        self.abstractor = abstractor
        self.abstractor_name = abstractor_name or self.lanpo.abstraction.abstractor
        self.extraction = tuple(extraction)
        self.seed = seed
        self.guard = guard or LeakageGuard(enabled=self.lanpo.leakage_guard)
        self.control = self.lanpo.failure_control
        if self.control != "off":
            log.warning("lanpo.failure_control=%s: this run breaks the method on purpose (a control arm of the "
                        "experiment, docs/results.md); its leakage guard only counts", self.control)

    def build(self, problems: Sequence[Any], step: int, kinds: Iterable[str] = ("reflection", "abstraction"),
              policy_version: int | None = None) -> FeedbackBatch:
        batch = FeedbackBatch()
        kinds = set(kinds)
        if "reflection" in kinds:
            batch.update(self.reflection(problems, step))
        if "abstraction" in kinds:
            batch.update(self.abstraction(problems, step, policy_version=policy_version))
        return batch

    # ------------------------------------------------------------------------------------- reflection
    def reflection(self, problems: Sequence[Any], step: int) -> FeedbackBatch:
        cfg = self.lanpo.reflection
        batch = FeedbackBatch()
        found = self.pool.earlier_attempts([p.id for p in problems], cfg.max_attempts, cfg.selection,
                                           before_step=step, seed=self.seed)
        for p in problems:
            attempts = found.get(p.id) or []
            if not attempts:
                batch.stats["reflection/no_source"] += 1
                continue
            leak = self.control == "leak_correctness"
            rewards = self.pool.rewards_of([a.uid for a in attempts]) if leak else {}
            shown = []
            for a in attempts:
                text, changes = prepare_attempt(a.response, a.extracted_answer, max_chars=cfg.max_attempt_chars,
                                                redact=cfg.redact_answers and not leak, extraction=self.extraction)
                batch.stats["reflection/redactions"] += changes
                if leak:
                    verdict = "correct" if (rewards.get(a.uid) or 0.0) > 0 else "incorrect"
                    text = f"{text}\n{LEAKED_VERDICT.format(verdict=verdict)}"
                shown.append(text)
            messages, context_text = reflection_messages(p.question, shown, self.prompts, leaked=leak)
            if not self._passes("reflection", shown, p, batch, enforce=not leak):
                continue
            batch.contexts[(p.id, "reflection")] = FeedbackContext(
                p.id, "reflection", messages, tuple(a.uid for a in attempts), context_text, audited=tuple(shown))
            batch.stats["reflection/built"] += 1
        return batch

    # ------------------------------------------------------------------------------------ abstraction
    def abstraction(self, problems: Sequence[Any], step: int | None,
                    policy_version: int | None = None) -> FeedbackBatch:
        """Abstraction contexts from experiences written before `step` (None: the whole pool, as evaluation reads it).

        Lessons come from the pool when stored for the same sources, else from one abstractor request per
        distinct source set of this call; the new ones are in `batch.lesson_sets()`."""
        cfg = self.lanpo.abstraction
        if self.control == "raw_experiences":
            return self._raw_experiences(problems, step)
        batch = FeedbackBatch()
        sources: dict[str, list[Any]] = {}
        lessons_for: dict[str, list[str]] = {}
        requests: dict[str, tuple[Any, list[Any]]] = {}  # lesson key -> (first problem, experiences)
        for p in problems:
            exps = self._sources(p, step, cfg.min_similarity, batch)
            if not exps:
                continue
            sources[p.id] = exps
            stored = self.pool.get_lessons([e.uid for e in exps])
            if stored is not None:
                lessons_for[p.id] = stored
                batch.stats["abstraction/lessons_cached"] += 1
            else:
                requests.setdefault(lesson_key(e.uid for e in exps), (p, exps))
        self._generate(requests, batch, step, policy_version)
        for p in problems:
            if p.id not in sources:
                continue
            exps = sources[p.id]
            lessons = lessons_for.get(p.id)
            if lessons is None:
                made = batch.new_lessons.get(lesson_key(e.uid for e in exps))
                lessons = list(made.lessons) if made else []
            if not lessons:
                batch.stats["abstraction/no_lessons"] += 1
                continue
            messages, context_text = abstraction_solve_messages(p.question, lessons, self.prompts)
            if not self._passes("abstraction", lessons, p, batch):
                continue
            batch.contexts[(p.id, "abstraction")] = FeedbackContext(
                p.id, "abstraction", messages, tuple(e.uid for e in exps), context_text, tuple(lessons),
                audited=tuple(lessons))
            batch.stats["abstraction/built"] += 1
        return batch

    def _sources(self, problem: Any, step: int | None, min_similarity: float | None, batch: FeedbackBatch) -> list:
        """The experiences of other problems an abstraction context draws on (counted as `no_source` when none)."""
        cfg = self.lanpo.abstraction
        exps = self.pool.similar_experiences(
            problem.id, problem.question, top_k=cfg.top_k, min_similarity=min_similarity,
            duplicate_similarity=cfg.duplicate_similarity, successful_only=cfg.successful_only,
            source_choice=cfg.source_choice, before_step=step)
        if not exps:
            batch.stats["abstraction/no_source"] += 1
        return exps

    def _passes(self, kind: str, parts: Sequence[str], problem: Any, batch: FeedbackBatch,
                enforce: bool = True) -> bool:
        """The guard's verdict on a context (counted); `enforce=False` (a failure control) only counts what it
        would have dropped, as `<kind>/would_drop`."""
        if enforce:
            audit = self.guard.check(kind, parts, problem.answer, problem.question)
            count_audit(batch.stats, kind, audit)
            return audit.ok
        audit = audit_context(parts, problem.answer, problem.question,
                              allow_gold_in_problem=self.guard.allow_gold_in_problem)
        batch.stats[f"{kind}/audited"] += 1
        batch.stats[f"{kind}/would_drop"] += 0 if audit.ok else 1
        return True

    def _raw_experiences(self, problems: Sequence[Any], step: int | None) -> FeedbackBatch:
        """`failure_control: raw_experiences`: the top-k experiences of other problems, no threshold, shown as
        they are (problem and response) instead of lessons; the guard only counts."""
        cfg = self.lanpo.abstraction
        batch = FeedbackBatch()
        for p in problems:
            exps = self._sources(p, step, None, batch)
            if not exps:
                continue
            parts = [EXPERIENCE_TEMPLATE.format(n=i + 1, problem=e.problem_text.strip(),
                                                response=e.response.strip()[:cfg.max_experience_chars])
                     for i, e in enumerate(exps)]
            user = RAW_EXPERIENCES_TEMPLATE.format(problem=p.question, experiences="\n\n".join(parts),
                                                   instruction=self.prompts.solve_instruction)
            self._passes("abstraction", parts, p, batch, enforce=False)
            batch.contexts[(p.id, "abstraction")] = FeedbackContext(
                p.id, "abstraction", _messages(user, self.prompts), tuple(e.uid for e in exps),
                RAW_EXPERIENCES_TEMPLATE.format(problem="", experiences="\n\n".join(parts), instruction=""),
                audited=tuple(parts))
            batch.stats["abstraction/built"] += 1
        return batch

    def _generate(self, requests: dict[str, tuple[Any, list[Any]]], batch: FeedbackBatch, step: int | None,
                  policy_version: int | None) -> None:
        """Ask for the lessons of every requested source set; the usable ones go to `batch.new_lessons`."""
        cfg = self.lanpo.abstraction
        if not requests:
            return
        keys = list(requests)
        if self.abstractor_name == "extractive":
            texts = ["\n".join(f"- {x}" for x in extractive_lessons([e.problem_text for e in requests[k][1]],
                                                                     cfg.max_lessons, requests[k][0].question))
                     for k in keys]
            self._keep(requests, keys, texts, batch, step, policy_version)
            return
        if self.abstractor is None:
            batch.stats["abstraction/no_abstractor"] += len(requests)
            return
        conversations = [
            abstraction_request_messages([(e.problem_text, e.response) for e in requests[k][1]], cfg.max_lessons,
                                         self.prompts, cfg.max_experience_chars)
            for k in keys
        ]
        batch.stats["abstraction/abstractor_calls"] += len(conversations)
        try:
            texts = list(self.abstractor(conversations))
        except Exception as e:  # a failing abstractor costs this step its abstraction contexts, not the run
            log.warning("abstractor failed on %d requests: %s", len(conversations), e)
            batch.stats["abstraction/abstractor_errors"] += len(conversations)
            return
        if len(texts) != len(conversations):
            raise ValueError(f"the abstractor returned {len(texts)} texts for {len(conversations)} conversations")
        self._keep(requests, keys, texts, batch, step, policy_version)

    def _keep(self, requests: dict[str, tuple[Any, list[Any]]], keys: list[str], texts: Sequence[str],
              batch: FeedbackBatch, step: int | None, policy_version: int | None) -> None:
        cfg = self.lanpo.abstraction
        for key, text in zip(keys, texts):
            lessons, stripped = parse_lessons(text or "", cfg.max_lessons)
            batch.stats["abstraction/lessons_stripped"] += stripped
            if not lessons:
                continue
            problem, exps = requests[key]
            batch.new_lessons[key] = LessonSet(tuple(e.uid for e in exps), tuple(lessons), step, problem.id,
                                               problem.question, self.abstractor_name, policy_version)
            batch.stats["abstraction/lessons_generated"] += 1
