"""Typed run configuration for lanpo.

One `RunConfig` holds everything a run needs. It is loaded from a YAML file (see `configs/`) plus dotted
overrides (`--set grpo.learning_rate=1e-6`), and validated before any work starts: an unknown key, a value of
the wrong type or out of range fails with the key, the file and what was expected.

Every field carries a docstring (pydantic reads them as field descriptions, so they also show in the JSON
schema that the Prefect UI renders). Where a default comes from METHOD.md (docs/METHOD.md) or from
TRL, the docstring says so; `docs/defaults.md` records why each LANPO default was chosen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUNDLED_POLICY = "smollm2-135m-instruct"
BUNDLED_EMBEDDER = "all-minilm-l6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# --------------------------------------------------------------------------------------------- model
class LoraConfig(_Section):
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (peft `lora_alpha`)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or peft's `all-linear`."""


class ModelConfig(_Section):
    name_or_path: str = BUNDLED_POLICY
    """Policy model: the bundled `smollm2-135m-instruct`, a local folder, or a Hugging Face hub name."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub name."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype of the master weights (`auto`: the checkpoint's own). Keep float32 and let `grpo.bf16` decide the
    compute precision."""
    trust_remote_code: bool = False
    """Passed to transformers; needed by some hub models."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA settings (off by default: the 135M model is trained in full)."""


# ---------------------------------------------------------------------------------------------- data
class ArithmeticConfig(_Section):
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    """Operations to draw from."""
    min_digits: int = Field(1, ge=1, le=9)
    """Fewest digits per operand."""
    max_digits: int = Field(1, ge=1, le=9)
    """Most digits per operand."""
    operand_ranges: list[tuple[int, int]] | None = Field(None, min_length=2, max_length=4)
    """Inclusive range of each operand in order, e.g. `[[0, 25], [0, 25]]`, `[[10, 99], [0, 9]]` (two-digit with
    one-digit) or three `[0, 9]` (three terms); replaces `min_digits`/`max_digits` when set. Operations are drawn
    per gap; `*` binds tighter than `+`/`-`."""
    allow_negative: bool = False
    """Allow subtractions with a negative result (otherwise operands are swapped)."""
    heldout_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    """Share of all distinct questions kept for the held-out split; train and held-out never share a question."""
    seed: int = 0
    """Seed of the generator: the same seed always gives the same problems and the same split."""

    @model_validator(mode="after")
    def _digits_ordered(self) -> "ArithmeticConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) must be <= max_digits ({self.max_digits})")
        for lo, hi in self.operand_ranges or ():
            if not 0 <= lo <= hi <= 10**9:
                raise ValueError(f"operand_ranges: each range must be [low, high] with 0 <= low <= high, got "
                                 f"[{lo}, {hi}]")
        return self


class DatasetConfig(_Section):
    format: Literal["arithmetic", "gsm8k", "math", "competition", "table", "hf"] = "arithmetic"
    """How to read it: procedural `arithmetic`; `gsm8k` JSONL (gold after `####`); `math` JSONL (`answer`, else
    last `\\boxed{}` of `solution`); `competition` JSONL (AIME/AMC: `problem`/`question` and `answer`); `table` for
    any JSONL/CSV/parquet with the column mapping below; `hf` for a Hugging Face hub dataset."""
    path: str | None = None
    """File to read (not for `arithmetic`/`hf`). Relative paths are resolved against the config file's folder,
    then the current directory; `${shared}` expands to the shared data folder (env `LANPO_SHARED_DATA`)."""
    name: str | None = None
    """Short label used in ids, metrics and reports. Default: derived from the format and path."""
    split: str = "train"
    """`arithmetic`: `train` or `heldout`; `hf`: the dataset split."""
    hf_name: str | None = None
    """Hub dataset name for `format: hf`, e.g. `openai/gsm8k`."""
    hf_config: str | None = None
    """Hub dataset config name, e.g. `main` for GSM8K."""
    question_field: str = "question"
    """Column with the problem text (`table`/`hf`)."""
    answer_field: str = "answer"
    """Column with the gold answer (`table`/`hf`)."""
    answer_style: Literal["plain", "gsm8k", "boxed"] = "plain"
    """How the gold answer column is written (`table`/`hf`): as is, GSM8K `#### N`, or the last `\\boxed{}`."""
    id_field: str | None = None
    """Optional column with a source id, kept in metadata (the problem id is always the content hash)."""
    limit: int | None = Field(None, ge=1)
    """Keep only the first N problems (after shuffling when `shuffle`)."""
    shuffle: bool = False
    """Shuffle with `seed` before `limit`."""
    seed: int = 0
    """Seed for `shuffle`."""
    size: int = Field(200, ge=1)
    """`arithmetic` only: number of problems to draw for this split (capped by the distinct questions available)."""
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    """`arithmetic` only: generator settings."""

    @model_validator(mode="after")
    def _needs_source(self) -> "DatasetConfig":
        if self.format in ("gsm8k", "math", "competition", "table") and not self.path:
            raise ValueError(f"format '{self.format}' needs a `path`")
        if self.format == "hf" and not self.hf_name:
            raise ValueError("format 'hf' needs `hf_name`")
        if self.format == "arithmetic" and self.split not in ("train", "heldout"):
            raise ValueError(f"arithmetic split must be 'train' or 'heldout', got '{self.split}'")
        return self


class DataConfig(_Section):
    train: DatasetConfig = Field(default_factory=DatasetConfig)
    """Training problems."""
    eval: list[DatasetConfig] = Field(
        default_factory=lambda: [DatasetConfig(split="heldout", size=100, name="arithmetic-heldout")]
    )
    """Held-out benchmarks for evaluation."""


# ----------------------------------------------------------------------------------- prompts, verify
class PromptConfig(_Section):
    solve_instruction: str = "Reason step by step, and put your final answer within \\boxed{}."
    """Appended to the problem in the plain solve prompt (METHOD.md step 2)."""
    system_prompt: str | None = None
    """System message; None keeps the chat template's own default."""


class VerifyConfig(_Section):
    extraction: list[Literal["boxed", "hashes", "answer_is", "last_number"]] = Field(
        default_factory=lambda: ["boxed", "hashes", "answer_is", "last_number"], min_length=1
    )
    """Answer extractors tried in order: last `\\boxed{}`, GSM8K `#### N`, "the answer is X", last number."""
    timeout_seconds: float = Field(5.0, gt=0.0, le=600.0)
    """Per-item limit on parsing and comparison; a runaway item is stopped and scored `timeout` (reward 0)."""
    format_reward: float = Field(0.0, ge=0.0, le=1.0)
    """Bonus for a well-formed `\\boxed{}` answer (METHOD.md step 6: off by default)."""
    float_rounding: int = Field(6, ge=0, le=15)
    """Decimal places math-verify rounds floats to before comparing."""


# ---------------------------------------------------------------------------------------------- rollout
class VllmConfig(_Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Engine dtype. `auto`: bf16 where the hardware computes it natively (CUDA with bf16; CPUs with AVX512-BF16 or
    AMX), else fp32, decided at run time (lanpo_core/hardware.py; docs/defaults.md, "Precision")."""
    enforce_eager: bool = True
    """Skip graph capture/compilation: on CPU it costs more time at start than it gains (docs/defaults.md)."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    """GPU only: share of device memory vLLM may take (it shares the GPU with the trainer)."""
    cpu_kv_cache_gib: int = Field(2, ge=1)
    """CPU only: KV-cache size (env VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int = Field(2048, ge=64)
    """Longest prompt+completion the engine accepts."""
    sync_dir: str | None = None
    """Folder for the weight-sync file (one safetensors, rewritten per sync); None: /dev/shm if writable, else tmp."""


class ServerConfig(_Section):
    urls: list[str] = Field(default_factory=list)
    """Base URLs of running `vllm serve` servers (e.g. `http://10.0.0.5:8000`); several = data parallel, the
    requests of a call are spread over them. How to start one: lanpo_core/rollout/server_worker.py."""
    timeout_seconds: float = Field(600.0, gt=0)
    """Per HTTP request."""
    retries: int = Field(3, ge=0)
    """Retries of a request whose connection failed or dropped (with backoff), before the run fails naming the URL."""
    sync_dir: str | None = None
    """Folder the weight file is written to for the servers to reload; it must be the same path on the servers'
    machines (a shared filesystem). None: a temporary folder on this machine (servers on 127.0.0.1)."""


class RolloutConfig(_Section):
    backend: Literal["auto", "vllm", "transformers", "vllm-server"] = "auto"
    """`auto` uses vLLM when importable and usable, else transformers `generate`; `vllm-server` generates on the
    running servers of `rollout.server`."""
    num_generations: int = Field(8, ge=2)
    """G: rollouts per problem (METHOD.md step 1)."""
    batch_problems: int = Field(8, ge=1)
    """B: problems per training step."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling; 0 disables (TRL's default)."""
    max_new_tokens: int = Field(256, ge=1)
    """Most tokens generated per completion."""
    max_prompt_tokens: int = Field(1024, ge=16)
    """Longest prompt; a longer one is refused whole (nothing generated, counted and logged), never cut: a cut
    feedback context could hide what the leakage guard audited."""
    logprobs: Literal["auto", "raw", "processed"] = "auto"
    """Per-token log-probs returned with each completion: `raw` = log-softmax of the unmodified logits (T=1, no
    top-k/top-p), `processed` = of the distribution actually sampled (after temperature, top-k, top-p); `auto` =
    raw when the trainer scores at temperature 1 (`grpo.logprob_temperature`), else processed. A config whose
    sampling and trainer log-probs would disagree is refused."""
    transformers_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype of the transformers backend's generation (`bfloat16` = bf16 autocast over the fp32 weights);
    `auto` as for `vllm.dtype`."""
    transformers_batch_size: int = Field(64, ge=1)
    """Sequences per batched `generate` call in the transformers backend (left-padded)."""
    progress: bool = True
    """Show a progress bar for generation batches of more than one `transformers_batch_size`/64 sequences."""
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    """vLLM engine settings."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    """The servers of `backend: vllm-server`."""

    @model_validator(mode="after")
    def _servers_named(self) -> "RolloutConfig":
        if self.backend == "vllm-server" and not self.server.urls:
            raise ValueError("rollout.backend 'vllm-server' needs rollout.server.urls (the servers' base URLs)")
        return self


# ------------------------------------------------------------------------------------------------ lanpo
class RolloutMix(_Section):
    plain: float = Field(0.5, ge=0.0)
    """Share of the G rollouts generated from the plain prompt."""
    reflection: float = Field(0.25, ge=0.0)
    """Share generated with reward-agnostic reflection on earlier attempts at the same problem."""
    abstraction: float = Field(0.25, ge=0.0)
    """Share generated with lessons abstracted from relevant other problems."""

    @model_validator(mode="after")
    def _sums_to_one(self) -> "RolloutMix":
        total = self.plain + self.reflection + self.abstraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"plain + reflection + abstraction must sum to 1, got {total:g}")
        return self

    def counts(self, group_size: int) -> dict[str, int]:
        """Split G rollouts by the mix (largest remainder), so the kinds sum exactly to G."""
        shares = {"plain": self.plain, "reflection": self.reflection, "abstraction": self.abstraction}
        raw = {k: v * group_size for k, v in shares.items()}
        counts = {k: int(v) for k, v in raw.items()}
        left = group_size - sum(counts.values())
        for k in sorted(raw, key=lambda k: (raw[k] - counts[k], k == "plain"), reverse=True)[:left]:
            counts[k] += 1
        return counts


class ReflectionConfig(_Section):
    max_attempts: int = Field(1, ge=1, le=8)
    """Earlier attempts at the same problem shown in the reflection prompt (METHOD.md step 3)."""
    selection: Literal["most_recent", "random"] = "most_recent"
    """How attempts are chosen; never by reward (that would leak it)."""
    max_attempt_chars: int = Field(2000, ge=100)
    """Each shown attempt is cut to this many characters (head kept)."""
    redact_answers: bool = True
    """Hide every shown attempt's own final answer and correctness words before the guard, whatever its reward."""


class AbstractionConfig(_Section):
    top_k: int = Field(4, ge=1, le=64)
    """Experiences retrieved from other problems (METHOD.md step 4)."""
    min_similarity: float | None = Field(0.6, ge=-1.0, le=1.0)
    """Cosine threshold for relevance; None disables it (the paper's ablation). 0.6 is measured for
    all-MiniLM-L6-v2 on GSM8K: the 99th percentile of random question pairs (docs/defaults.md)."""
    duplicate_similarity: float = Field(0.9, ge=0.0, le=1.0)
    """At or above this similarity (or identical normalised text) counts as the same problem. 0.9, not the METHOD's
    0.97: MiniLM puts GSM8K inverse variants (one's answer is given in the other) and commuted sums at 0.90-0.99."""
    successful_only: bool = True
    """Show only experiences with reward > 0 (rewards of *other* problems may steer selection)."""
    max_lessons: int = Field(3, ge=1, le=10)
    """Most lessons the abstractor may write."""
    abstractor: str = "policy"
    """`policy` (the current policy), a model spec for a separate fixed abstractor, or `extractive` (no model: the
    number-free statements that recur in the retrieved problems' texts; see lanpo_core/feedback.py)."""
    max_new_tokens: int = Field(192, ge=16)
    """Token budget of the abstractor's answer."""
    source_choice: Literal["earliest", "latest"] = "earliest"
    """Which eligible rollout of a retrieved problem is shown; `earliest` keeps source sets stable (lessons reused)."""
    max_experience_chars: int = Field(1500, ge=100)
    """Each experience shown to the abstractor is cut to this many characters (head kept)."""


class OffPolicyConfig(_Section):
    correction: Literal["none", "sequence_truncated", "token_truncated", "geometric", "shaped"] = "token_truncated"
    """Weight of context-sampled responses trained under the plain prompt (METHOD.md step 8; formulas and the
    measurements behind the default: docs/update.md, "Off-policy estimators")."""
    max_ratio: float = Field(2.0, ge=1.0)
    """Cap on the importance ratio (per sequence, or per token for `token_truncated`)."""
    shaping_gamma: float = Field(0.1, gt=0.0)
    """g of the `shaped` estimator w_t = (1 + g) r_t / (r_t + g): smaller g keeps more weight on tokens the plain
    prompt finds unlikely."""
    negative_advantage: Literal["drop", "keep"] = "drop"
    """`drop` zeroes the weight of context-sampled responses with negative advantage."""
    min_context_mass_frac: float = Field(0.1, ge=0.0)
    """Warn (one log line per step) when the context kinds' weight mass sum |A w| is below this fraction of the plain
    kind's: the context rollouts then barely move the update. 0 disables the warning; it never changes training."""

    @field_validator("correction", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if value == "truncated_is":
            raise ValueError("`truncated_is` was renamed `sequence_truncated` (2026-12-02); the estimators are none, "
                             "sequence_truncated, token_truncated, geometric and shaped")
        return value


class LanpoConfig(_Section):
    rollout_mix: RolloutMix = Field(default_factory=RolloutMix)
    """How the G rollouts of a group split by kind; `{plain: 1}` is plain GRPO."""
    reflection: ReflectionConfig = Field(default_factory=ReflectionConfig)
    """Reward-agnostic reflection (same problem)."""
    abstraction: AbstractionConfig = Field(default_factory=AbstractionConfig)
    """Relevant abstraction (other problems)."""
    train_prompt: Literal["plain", "context"] = "plain"
    """Prompt that context-sampled responses are trained under (`context` is the ablation)."""
    offpolicy: OffPolicyConfig = Field(default_factory=OffPolicyConfig)
    """Off-policy correction for `train_prompt: plain`."""
    baseline: Literal["group", "plain_only"] = "group"
    """Whose rewards set a group's advantage baseline (mean and std): `group`, all its rollouts; `plain_only`, its
    plain-sampled rollouts only (the whole group where it has fewer than two, or their std is 0 under
    `grpo.scale_rewards: group`), so context rollouts do not shift the plain ones' advantages."""
    context_in_update: bool = True
    """False leaves context-conditioned rollouts out of the update (no gradient, no share of the baseline, not in the
    loss normaliser); they are still generated, scored and pooled."""
    leakage_guard: bool = True
    """Audit every context for the gold answer and reward markers before use (METHOD.md step 5)."""
    failure_control: Literal["off", "leak_correctness", "raw_experiences"] = "off"
    """A CONTROL THAT BREAKS THE METHOD ON PURPOSE, for the experiment's failure-mode arms (docs/results.md); never
    for training a model. `leak_correctness`: naive same-problem feedback, each shown earlier attempt unredacted and
    followed by whether the verifier judged it correct. `raw_experiences`: naive other-problem feedback, the
    retrieved experiences shown as they are, without abstraction and without the similarity threshold. Either one
    turns the leakage guard into an audit that only counts (`feedback/<kind>/would_drop`) for the kind it breaks."""

    @model_validator(mode="after")
    def _control_has_its_kind(self) -> "LanpoConfig":
        kind = {"leak_correctness": "reflection", "raw_experiences": "abstraction"}.get(self.failure_control)
        if kind and getattr(self.rollout_mix, kind) <= 0:
            raise ValueError(f"failure_control={self.failure_control} breaks the {kind} rollouts, but "
                             f"rollout_mix.{kind} is 0")
        return self

    @property
    def is_plain_grpo(self) -> bool:
        return self.rollout_mix.plain >= 1.0


class PoolConfig(_Section):
    uri: str | None = None
    """LanceDB URI; None means `<run dir>/pool` (embedded). Any LanceDB URI works (e.g. object storage)."""
    embedding_model: str = BUNDLED_EMBEDDER
    """sentence-transformers model: the bundled `all-minilm-l6-v2`, a local folder or a hub name."""
    max_response_chars: int = Field(8000, ge=100)
    """Longer responses are truncated to this (head kept) before storage, and counted."""
    max_problem_chars: int = Field(8000, ge=100)
    """Rollouts whose problem text is longer are refused (counted): no benchmark problem comes near it."""
    optimize_every: int = Field(20, ge=0)
    """Compact fragments and update indices every N step writes (0: never); old versions are kept."""
    embed_batch_size: int = Field(64, ge=1)
    """Batch size for embedding problem texts."""


# ------------------------------------------------------------------------------------------------- grpo
class GrpoConfig(_Section):
    steps: int = Field(10, ge=0)
    """Training steps (one step = B problems x G rollouts, then one update)."""
    learning_rate: float = Field(1e-6, gt=0.0, le=1.0)
    """AdamW learning rate (TRL GRPOConfig default 1e-6)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule over `steps`."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """TRL loss aggregation (TRL 1.16 default `dapo`)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = (r - group mean) / std; `none` gives Dr. GRPO (METHOD.md step 8)."""
    epsilon: float = Field(0.2, gt=0.0)
    """Lower clip range of the PPO ratio (TRL default)."""
    epsilon_high: float | None = None
    """Upper clip range; None uses `epsilon` (TRL default)."""
    beta: float = Field(0.0, ge=0.0)
    """KL coefficient; 0 loads no reference model (TRL default)."""
    num_iterations: int = Field(1, ge=1)
    """Optimisation passes over each step's rollouts (TRL's mu)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward; gradients accumulate over the step's B x G sequences."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast for forward/backward (master weights stay in `model.dtype`). `auto`: on where bf16 is native
    (CUDA with bf16; CPUs with AVX512-BF16 or AMX), off elsewhere, where bf16 runs 10-100x slower than fp32."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (TRL default is on; off is faster for small models)."""
    checkpoint_keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk."""
    checkpoint_background: bool = False
    """Write each step's checkpoint in a thread while the next stages run. Off by default: on a 2-core CPU the write
    competes with those stages and the run got slower (docs/defaults.md); with cores to spare it takes the write off
    the critical path. Resume stays exact either way (a checkpoint a kill cut short is written again)."""
    logprob_temperature: float | Literal["auto"] = "auto"
    """Temperature the trainer scores tokens at (TRL `temperature`). `auto` = `rollout.temperature`, the behaviour
    temperature: the policy gradient is taken at the temperature the rollouts were sampled at (as in TRL's
    GRPOTrainer), and so are the sampling log-probs of the importance weights (`rollout.logprobs: auto` then returns
    processed log-probs). 1.0 = raw model log-probs (with `rollout.logprobs: raw`)."""

    @model_validator(mode="after")
    def _positive_temperature(self) -> "GrpoConfig":
        if self.logprob_temperature != "auto" and not self.logprob_temperature > 0:
            raise ValueError(f"logprob_temperature must be 'auto' or > 0, got {self.logprob_temperature}")
        return self


class TrainerConfig(_Section):
    channel: str | None = None
    """Folder the flow and a running trainer (`lanpo trainer`) exchange steps through: a request file per step from the
    flow, a response after the checkpoint is on disk, and the trainer's heartbeat (lanpo_core/trainer.py). Required
    with `update.placement: trainer`. The flow and the trainer's rank 0 must both see it, and every rank must see the
    run folder (checkpoints are read from there on resume)."""
    timeout_seconds: float = Field(3600.0, gt=0)
    """Longest wait for one step's checkpoint; the stage then fails naming the trainer and the file it waited for."""
    liveness_seconds: float = Field(60.0, gt=0)
    """A trainer whose heartbeat is older than this, or whose process is gone, fails the stage (after the flow has
    waited this long itself, so a trainer still starting up gets the time)."""
    poll_seconds: float = Field(0.5, gt=0)
    """How often the flow looks for the response and the heartbeat."""


class UpdateConfig(_Section):
    placement: Literal["in_process", "trainer"] = "in_process"
    """Where the policy update runs: `in_process` (the flow's process, one device) or `trainer` (a long-lived
    `accelerate launch` trainer, any number of ranks, reached through `update.trainer.channel`; docs/scale-out.md).
    Both run the same update and write the same checkpoints."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """The trainer of `placement: trainer`."""

    @model_validator(mode="after")
    def _channel_named(self) -> "UpdateConfig":
        if self.placement == "trainer" and not self.trainer.channel:
            raise ValueError("update.placement 'trainer' needs update.trainer.channel (the folder the trainer watches)")
        return self


# ------------------------------------------------------------------------------------------------- eval
class EvalConfig(_Section):
    every: int = Field(5, ge=0)
    """Evaluate every N steps (and always at the end); 0 only at the end."""
    samples: int = Field(4, ge=1)
    """k for mean@k at `temperature`."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature for mean@k."""
    greedy: bool = True
    """Also report greedy pass@1."""
    max_new_tokens: int = Field(256, ge=1)
    """Token budget for evaluation answers."""
    limit: int | None = Field(None, ge=1)
    """Evaluate at most N problems per benchmark."""
    feedback: bool = False
    """Also report feedback-augmented greedy pass@1 (METHOD.md step 9, secondary): abstraction lessons made from the
    training pool's experiences of similar problems, never from the test problem; the pool is only read. Costs one
    abstractor call per new source set plus one greedy pass. Off by default (opt-in, like every addition)."""
    at_start: bool = True
    """Also evaluate the base policy before the first step (logged at step 0): the "before" of a run's accuracy.
    Cached like every evaluation, so it is paid once per config."""


# --------------------------------------------------------------------------------------- tracking, paths
class TrackingConfig(_Section):
    mlflow_tracking_uri: str | None = None
    """None: env MLFLOW_TRACKING_URI, else a sqlite file under `mlruns/`."""
    experiment: str = "lanpo"
    """MLflow experiment name."""
    log_rollout_samples: int = Field(16, ge=0)
    """Rollouts logged per step, the first N of the step (whole groups when N is a multiple of G; 0: none): rows of
    the run's `completions.json` table (question, gold answer, kind, context, response, extracted answer, reward) and
    `rollouts/step-<t>.yaml`."""
    system_metrics: bool = True
    """MLflow's system metrics (`system/*`: CPU, memory, disk, network) for the run, sampled by a thread of the flow's
    process every 10 s (env MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL): about 0.1 ms of CPU and one small write per
    sample."""


class PathsConfig(_Section):
    runs_dir: str = "runs"
    """Run folders (checkpoints, pool, results) go under here."""
    cache_dir: str | None = None
    """Prepared bundled models; None: env LANPO_CACHE_DIR, else ~/.cache/lanpo."""


class RunConfig(_Section):
    """A whole run. Sections mirror the pipeline stages."""

    name: str = "lanpo"
    """Run name (MLflow run name, run folder prefix)."""
    seed: int = 0
    """Global seed (sampling, data order, init of new parameters)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and evaluation data."""
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    """Solve prompt."""
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    """Answer extraction and verification."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout generation."""
    lanpo: LanpoConfig = Field(default_factory=LanpoConfig)
    """LANPO feedback; `rollout_mix: {plain: 1}` turns it into plain GRPO."""
    pool: PoolConfig = Field(default_factory=PoolConfig)
    """Experience pool."""
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    """Policy update."""
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    """Where the update runs (in the flow's process, or on a multi-process trainer)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""
    paths: PathsConfig = Field(default_factory=PathsConfig)
    """Where things are written."""

    source: str | None = Field(None, exclude=True)
    """File the config was read from (set by `load_config`, not by users)."""

    def trainer_temperature(self) -> float:
        """`grpo.logprob_temperature` with `auto` resolved: the rollouts' sampling temperature (1.0 if greedy)."""
        if self.grpo.logprob_temperature == "auto":
            return self.rollout.temperature if self.rollout.temperature > 0 else 1.0
        return float(self.grpo.logprob_temperature)

    def logprobs_mode(self) -> Literal["raw", "processed"]:
        """`rollout.logprobs` with `auto` resolved: raw when the trainer scores at temperature 1, else processed."""
        if self.rollout.logprobs != "auto":
            return self.rollout.logprobs
        return "raw" if self.trainer_temperature() == 1.0 else "processed"

    @model_validator(mode="after")
    def _logprobs_agree(self) -> "RunConfig":
        # The importance weight divides the trainer's probability by the sampling one; both must be taken from the
        # same distribution, or the weight measures the mismatch instead of the prompt change.
        t, mode, r = self.trainer_temperature(), self.logprobs_mode(), self.rollout
        if mode == "processed" and r.temperature > 0 and t != r.temperature:
            raise ValueError(f"rollout.logprobs 'processed' are taken at rollout.temperature {r.temperature:g}, but "
                             f"grpo.logprob_temperature is {t:g}: set it to 'auto' (or to {r.temperature:g})")
        if mode == "raw" and t != 1.0:
            raise ValueError(f"rollout.logprobs 'raw' are taken at temperature 1, but grpo.logprob_temperature is "
                             f"{t:g}: set rollout.logprobs to 'auto' (or 'processed')")
        reads_sampling = (self.lanpo.offpolicy.correction != "none" and self.lanpo.train_prompt == "plain"
                          and (self.lanpo.rollout_mix.reflection > 0 or self.lanpo.rollout_mix.abstraction > 0))
        if mode == "processed" and reads_sampling and (r.top_p < 1.0 or r.top_k > 0):
            raise ValueError(f"rollout.top_p {r.top_p:g} / rollout.top_k {r.top_k} renormalise the sampled "
                             "distribution, which the trainer cannot reproduce, so the off-policy weights would be "
                             "wrong: set rollout.top_p: 1 and rollout.top_k: 0, or lanpo.offpolicy.correction: none")
        return self

    def digest(self) -> str:
        """Stable hash of every setting (cache keys, run ids)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Dotted `key: value` view (MLflow params): lists of sections are indexed (`data.eval.0.name`), so that
        each of their fields is a value of its own; lists of plain values (`verify.extraction`) stay lists."""
        return flatten(self.model_dump(mode="json"))


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key, the file and what was expected."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value); the value is read as a YAML scalar/flow value (`1e-6`, `true`, `[a, b]`)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. grpo.learning_rate=1e-6")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': the key must be dotted names, e.g. grpo.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.problem})") from None
    # YAML reads 1e-6 as a string (it wants 1.0e-6); numbers are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node: Any = tree
    parts = key.split(".")
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            known = ", ".join(sorted(k for k in model.model_fields if k != "source"))
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{origin}: unknown key '{key}' ('{part}' is not in {where}; known: {known})")
        annotation = model.model_fields[part].annotation if model is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _type_name(loc_key: str, err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    names = {
        "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
        "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
        "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
        "model_type": "a mapping", "literal_error": "one of " + str(err.get("ctx", {}).get("expected", "")),
        "extra_forbidden": "no such key",
    }
    return names.get(kind, err.get("msg", kind))


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f", got {got!r}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"].startswith(("greater", "less")) or e["type"] in ("value_error", "too_short", "too_long"):
            lines.append(f"  {key}: {e['msg']}{got_s}")
        else:
            lines.append(f"  {key}: expected {_type_name(key, e)}{got_s}")
    return f"invalid config ({origin}):\n" + "\n".join(lines)


def build_config(tree: dict[str, Any], overrides: list[str] | None = None, origin: str = "<dict>") -> RunConfig:
    """Validate a config tree plus `KEY=VALUE` overrides into a RunConfig (raises ConfigError)."""
    tree = json.loads(json.dumps(tree))  # deep copy, and fail early on non-plain values
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"override '{text}'")
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        where = origin + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(_format_validation(e, where)) from None
    cfg.source = None if origin == "<dict>" else origin
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: all defaults) and apply dotted overrides."""
    if path is None:
        return build_config({}, overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{at} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    cfg = build_config(tree, overrides, origin=str(p))
    cfg.source = str(p.resolve())
    return cfg
