"""LANPO policy update (METHOD.md step 8): a GRPO step with TRL on pre-generated, context-conditioned rollouts.

Generation happens in the rollout stage (TRL's vLLM mode does not work on CPU), so this stage receives a step's
finished rollouts as `RolloutSample`s and updates the policy in place. `PolicyUpdater` keeps the model loaded across
steps; the rollout engine reads the current weights from `PolicyUpdater.model`.

How TRL is used
---------------
TRL 1.16's `GRPOTrainer` is the engine: its config (loss types grpo / dr_grpo / dapo / bnpo, `epsilon`,
`epsilon_high`, `num_iterations`, `beta` with a reference model or, under LoRA, the adapter-disabled base), its
per-token log-prob kernel (`_get_per_token_logps_and_entropies`, fused LM head, autocast), its loss
(`compute_loss` -> `_compute_loss`: clipped ratio, KL, aggregation, clip/entropy/KL metrics), HF `Trainer`'s
`training_step` (autocast + backward), `create_optimizer` / `create_scheduler` (AdamW + schedule) and the accelerator's
gradient clipping. What is ours, and why:

* `_LanpoGRPOTrainer._prepare_inputs` is the identity. In TRL it generates completions, scores them, computes
  advantages, shuffles and buffers the generation batch. Here all of that happened upstream or in
  `PolicyUpdater._prepare`, because TRL cannot express the LANPO rules there (advantage over a group whose members
  were sampled from different prompts; per-sequence importance weights that need the *sampling* log-probs under
  another prompt; dropping negatives; skipping zero-signal sequences).
* `_LanpoGRPOTrainer._get_per_token_logps_and_entropies` calls TRL's and, with `num_iterations == 1`, passes the
  training forward's log-probs to a one-shot hook that turns them into the importance weights of that micro-batch
  (scaling its advantages in place before `_compute_loss` reads them). Without it the weight's numerator would
  cost a second, no-grad forward over every trained off-policy sequence.
* The per-update outer loop (`PolicyUpdater.step`): micro-batches through `trainer.training_step`, then
  `accelerator.clip_grad_norm_`, `optimizer.step()`, `lr_scheduler.step()`, `zero_grad()`. `Trainer.train()` owns a
  dataloader-driven loop that runs `max_steps` in one call and generates inside; the LANPO flow needs one
  externally fed update per call with the model kept in memory, so we call the same pieces in the same order.

The LANPO loss, and how it departs from textbook GRPO
-----------------------------------------------------
Textbook GRPO (DeepSeekMath; TRL `GRPOTrainer`): all G responses of a group are sampled from pi_old(.|q) with the
same prompt q; A_i = (r_i - mean_G r) / (std_G r + eps); per token the PPO-clipped ratio
rho_t = pi_theta(y_t|q,y_<t) / pi_old(y_t|q,y_<t); optional KL to a reference. (nanochat's chat_rl.py is simpler
still: on-policy REINFORCE with A = r - mean, no ratio, no clipping, no KL.) LANPO changes four things:

1. One group, several prompts. A group is all G rollouts of one problem, of every kind (plain, reflection,
   abstraction). The baseline (mean) and scale (std, Bessel-corrected like TRL) are taken over all of them, so a
   context-helped response is ranked against plain ones. `scale_rewards`: group (default), batch (global std), none
   (Dr. GRPO). eps = 1e-4 (TRL's).
2. Training prompt != sampling prompt. With `lanpo.train_prompt: plain` a context-conditioned response y, sampled
   from mu(.|q_ctx), is trained as log pi_theta(y|q_plain) (the thing that should improve zero-shot accuracy). It is
   off-policy, so (`offpolicy.correction: truncated_is`) it gets a per-sequence, detached weight
       w = min( exp( sum_t log pi_theta_old(y_t|q_plain,y_<t) - sum_t log mu(y_t|q_ctx,y_<t) ), max_ratio )
   with pi_theta_old = the weights at the start of this step and log mu = `RolloutSample.sampling_logprobs`
   (a token whose sampling log-prob is None/NaN contributes 0 to the sum, as in TRL). Plain-sampled rollouts and
   every rollout under `train_prompt: context` (trained under the prompt that produced it) have w = 1.
   `correction: none` uses w = 1 for everything.
3. Negatives dropped. With `offpolicy.negative_advantage: drop` an off-policy response (context-conditioned, trained
   under the plain prompt) with A < 0 gets w = 0: it was never sampled from the plain prompt, so pushing it down there
   is not justified. Counted as `dropped_negatives`. (`keep` leaves w as in 2.)
4. Zero-signal sequences are not run. Groups whose rewards are all equal (and singleton groups) have A = 0 and are
   counted (`zero_variance_groups`). When `beta == 0` every sequence with w*A == 0 has exactly zero loss and
   gradient, so it is left out of the forward/backward (a large saving). It still counts in the loss normaliser,
   exactly as TRL would count it, so the loss equals TRL's formula with those sequences present. With `beta > 0`
   every sequence is run (the KL term applies to them).

How w composes with TRL's clipped ratio. w multiplies the advantage: TRL receives A'_i = w_i * A_i. Since w >= 0,
-min(rho*A', clip(rho)*A') = -w * min(rho*A, clip(rho)*A), i.e. exactly "w times TRL's per-token clipped loss";
the KL term (beta) is not weighted, as in TRL's own vLLM importance-sampling correction. The per-token loss is
    L_it = -w_i * min(rho_it A_i, clip(rho_it, 1-epsilon, 1+epsilon_high) A_i) + beta * KL_it,
    rho_it = exp(log pi_theta(y_it|q_train) - log pi_old(y_it|q_train))
aggregated as TRL does: grpo = mean over sequences of the token mean; dapo = sum over tokens / all completion tokens
of the step; dr_grpo = sum / (N * rollout.max_new_tokens); bnpo = token mean per micro-batch, weighted by its share
of sequences (TRL's "local batch" definition). N and the token count include the sequences skipped in 4.
The ratio's denominator pi_old is always the policy's own log-prob under the *training* prompt, never the sampling
log-prob: with `num_iterations == 1` TRL uses per_token_logps.detach() (rho == 1, gradient = grad log pi); with
`num_iterations > 1` we compute it once, without gradient, at the start of the step. Feeding the sampling log-probs
(under q_ctx) as pi_old would make rho a per-token plain-vs-context likelihood ratio that is routinely orders of
magnitude from 1: clipping would silence most positive tokens (zero gradient outside the clip range) and leave the
negative ones unbounded. Keeping the two apart is the "decoupled PPO" form (behaviour policy mu for the importance
weight, proximal policy pi_old for the trust region), the same structure as TRL's
`vllm_importance_sampling_mode="sequence_truncate"`, where the mismatch is the prompt instead of the engine.
The numerator log pi_old(y|q_plain) costs no extra forward: with `num_iterations == 1` it is the training forward's
own (detached) log-prob, taken by the hook above; with `num_iterations > 1` it is the pi_old pass TRL needs anyway.

Temperature: the trainer scores tokens at `grpo.logprob_temperature` (default 1.0: raw model log-probs, which is
what `sampling_logprobs` must be: log-softmax of the unmodified logits at the sampling prompt). TRL's own
GRPOTrainer scores at its sampling temperature; set `logprob_temperature` = `rollout.temperature` to get that, and
then the rollout engine must return tempered log-probs (vLLM `logprobs_mode="processed_logprobs"`).

Precision: master weights in `model.dtype` (fp32 by default); `grpo.bf16` runs forward/backward under bf16 autocast
(`auto`: only where bf16 is native, lanpo_core/hardware.py). Gradient accumulation: the step's sequences are sorted
by length and cut into micro-batches of `grpo.micro_batch_size`, each padded to its own longest prompt/completion.

Checkpoints: `save_checkpoint()` writes weights (or the LoRA adapter), optimiser, scheduler, RNG states and counters
atomically under `<run_dir>/checkpoints/` (see checkpoint.py), keeps the last `grpo.checkpoint_keep_last`, and
returns a checksum of the weights. `PolicyUpdater.resume(...)` / `load_checkpoint(path)` restore them exactly.

Note: constructing a `PolicyUpdater` re-seeds python/numpy/torch with `config.seed` (TRL's trainer does it).
This module imports neither Prefect nor MLflow.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import (
    CheckpointInfo,
    capture_rng_state,
    checkpoint_info,
    latest_checkpoint,
    read_state,
    restore_rng_state,
    verify_checkpoint,
    write_checkpoint,
)
from .config import RunConfig
from .hardware import resolve_bf16

ADV_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)
_SCHEDULERS = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


@dataclass
class RolloutSample:
    """One finished rollout, as the rollout stage hands it to the update.

    `train_prompt_ids` are the token ids of the prompt the response is *trained* under (chat template applied,
    generation prompt included): the plain solve prompt for every rollout under `lanpo.train_prompt: plain`, the
    prompt it was sampled from under `train_prompt: context` (see `training_prompt_ids`). `completion_ids` are the
    generated tokens (the final EOS included if one was generated). `sampling_logprobs[t]` is log mu(completion_ids[t])
    at the *sampling* prompt, raw (temperature 1, no top-k/top-p renormalisation) unless
    `grpo.logprob_temperature` says otherwise; None or NaN entries are allowed (they count as "no correction" for that
    token). The log-probs are only read for context-conditioned rollouts trained under the plain prompt; they may be
    None otherwise. `context_conditioned` is authoritative (a context kind that fell back to plain is False); `kind`
    is used for metrics only."""

    group_id: str
    kind: str
    train_prompt_ids: list[int]
    completion_ids: list[int]
    sampling_logprobs: list[float | None] | None
    reward: float
    context_conditioned: bool


def training_prompt_ids(train_prompt: str, plain_prompt_ids: list[int], sampling_prompt_ids: list[int],
                        context_conditioned: bool) -> list[int]:
    """The prompt a rollout is trained under: the plain prompt (`train_prompt: plain`, or a plain rollout), else the
    context prompt it was sampled from."""
    if train_prompt == "plain" or not context_conditioned:
        return list(plain_prompt_ids)
    return list(sampling_prompt_ids)


# --------------------------------------------------------------------------------------------- TRL engine
@functools.lru_cache(maxsize=1)
def _make_trainer_class():
    from trl import GRPOTrainer

    class _LanpoGRPOTrainer(GRPOTrainer):
        """GRPOTrainer fed with finished micro-batches; two narrow overrides (see the module doc)."""

        _lanpo_logps_hook = None  # set by PolicyUpdater right before a micro-batch's training_step

        def _prepare_inputs(self, generation_batch):
            # TRL generates, scores, computes advantages, shuffles and buffers here. LANPO rollouts are generated and
            # scored upstream and PolicyUpdater._prepare builds complete micro-batches (advantages already weighted),
            # so the micro-batch passes through unchanged.
            return generation_batch

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            # With num_iterations == 1 the importance weight's numerator, log pi_old(y|q_plain), is exactly the
            # (detached) log-prob that _compute_loss computes here as its first step, so instead of a second forward
            # pass the hook turns it into w and scales the micro-batch's advantages in place; _compute_loss reads
            # inputs["advantages"] only after this call (TRL 1.16; the reference test fails if that changes).
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
            hook, self._lanpo_logps_hook = self._lanpo_logps_hook, None
            if hook is not None:
                hook(out[0])
            return out

    return _LanpoGRPOTrainer


def _unused_reward(completions, **kwargs):  # GRPOTrainer wants a reward function; rewards come with the samples
    return [0.0] * len(completions)


def build_grpo_args(config: RunConfig, output_dir: str | Path, **overrides: Any):
    """TRL `GRPOConfig` mirroring our config (also used by the benchmark and tests for vanilla TRL)."""
    from trl import GRPOConfig

    g = config.grpo
    mbs = g.micro_batch_size
    scheduler = _SCHEDULERS[g.lr_scheduler]
    if scheduler == "constant" and g.warmup_steps > 0:
        scheduler = "constant_with_warmup"
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=mbs,
        gradient_accumulation_steps=1,
        num_generations=2,  # generation is not done by the trainer here; 2 just satisfies GRPOConfig's checks
        steps_per_generation=2,
        max_completion_length=config.rollout.max_new_tokens,
        temperature=g.logprob_temperature,
        learning_rate=g.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=g.warmup_steps,
        weight_decay=g.weight_decay,
        max_grad_norm=g.max_grad_norm,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        beta=g.beta,
        num_iterations=g.num_iterations,
        max_steps=max(1, g.steps * g.num_iterations),
        bf16=resolve_bf16(g.bf16),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # enabled by PolicyUpdater itself (Trainer.train() would do it)
        seed=config.seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


@dataclass
class _Prepared:
    n_samples: int
    micro_batches: list[dict[str, Any]]
    """TRL inputs per micro-batch, plus private keys: `_ga_eff`, and `_is` (rows, sampling log-probs, mask) when
    the importance weight is computed in the training forward (num_iterations == 1)."""
    mb_tokens: list[int]
    metrics: dict[str, float]
    log_ratios: list[float]
    """Per trained off-policy sequence: log pi_old(y|q_plain) - log mu(y|q_ctx) (filled during the pass when deferred)."""


class PolicyUpdater:
    """Owns the policy, TRL trainer, optimiser and scheduler of a run; one `step(samples)` per LANPO step."""

    def __init__(self, config: RunConfig, model, tokenizer, run_dir: str | Path, *, ref_model=None):
        from datasets import Dataset

        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        g = config.grpo
        peft_config = None
        if config.model.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            lc = config.model.lora
            peft_config = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                         target_modules=lc.target_modules, task_type="CAUSAL_LM")
        args = build_grpo_args(config, self.run_dir / "trl")
        trainer_cls = _make_trainer_class()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rollout_func.*")
            self.trainer = trainer_cls(model=model, reward_funcs=_unused_reward, args=args,
                                       train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
                                       processing_class=tokenizer, peft_config=peft_config)
        if ref_model is not None and g.beta > 0 and not self.is_lora:
            # TRL loaded its own copy from `model.config._name_or_path`; an explicit reference replaces it
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(ref_model, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            ref_model.to(self.trainer.accelerator.device).eval().requires_grad_(False)
            self.trainer.ref_model = ref_model
        if g.gradient_checkpointing:
            base = self.trainer.model
            if self.is_lora:
                base.enable_input_require_grads()
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        self.device = self.trainer.accelerator.device
        self.pad_id = int(tokenizer.pad_token_id)
        self.step_count = 0
        """LANPO steps completed."""
        self.optimizer_steps = 0
        """Optimiser steps taken (num_iterations per LANPO step; a step with nothing to train still counts)."""
        self.last_checkpoint: CheckpointInfo | None = None

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model(self):
        """The trained model (a peft `PeftModel` under LoRA). Weights change in place at every step."""
        return self.trainer.model

    @property
    def is_lora(self) -> bool:
        from accelerate.utils import is_peft_model

        return is_peft_model(self.trainer.model)

    @property
    def optimizer(self):
        return self.trainer.optimizer

    @property
    def lr_scheduler(self):
        return self.trainer.lr_scheduler

    # ------------------------------------------------------------------------------------------ public API
    def step(self, samples: Sequence[RolloutSample]) -> dict[str, float]:
        """One LANPO update on a step's rollouts: `num_iterations` optimiser updates on the same batch.
        Returns per-step metrics (see `_prepare` / `_forward_backward` for the keys)."""
        t0 = time.perf_counter()
        self.model.train()  # the rollout engine may have left it in eval mode; TRL scores pi_old in train mode too
        prep = self._prepare(samples)
        t1 = time.perf_counter()
        trained = bool(prep.micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses, norms, pass_metrics = [], [], []
        lr = float(self.lr_scheduler.get_last_lr()[0])
        for _ in range(self.config.grpo.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss, m = self._forward_backward(prep)
            losses.append(loss)
            pass_metrics.append(m)
            if trained:
                norm = self.trainer.accelerator.clip_grad_norm_(params, self.config.grpo.max_grad_norm)
                norms.append(float(norm))
                self.optimizer.step()
            else:
                norms.append(0.0)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when nothing was trained
                warnings.simplefilter("ignore")
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        self.step_count += 1
        self.trainer.state.global_step = self.optimizer_steps
        metrics = dict(prep.metrics)
        metrics.update(pass_metrics[0])
        metrics.update(self._is_metrics(prep))
        metrics["loss"] = losses[0]
        metrics["loss_last_iteration"] = losses[-1]
        metrics["grad_norm"] = norms[0]
        metrics["grad_norm_max"] = max(norms)
        metrics["learning_rate"] = lr
        metrics["update_skipped"] = float(not trained)
        metrics["step"] = float(self.step_count)
        metrics["time/prepare_s"] = t1 - t0
        metrics["time/update_s"] = time.perf_counter() - t1
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def compute_gradients(self, samples: Sequence[RolloutSample]) -> dict[str, float]:
        """Forward/backward of the first pass only: gradients are left in `.grad` (zeroed first), no optimiser step.
        For tests and diagnostics; returns the same metrics as `step` minus the optimiser ones."""
        self.model.train()
        prep = self._prepare(samples)
        self.optimizer.zero_grad(set_to_none=True)
        loss, m = self._forward_backward(prep)
        out = dict(prep.metrics)
        out.update(m)
        out.update(self._is_metrics(prep))
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _pad(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        pmax = max(len(p) for p in prompts)
        cmax = max(len(c) for c in completions)
        n = len(prompts)
        prompt_ids = torch.full((n, pmax), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, pmax), dtype=torch.long)
        completion_ids = torch.full((n, cmax), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros((n, cmax), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if p:
                prompt_ids[i, pmax - len(p):] = torch.tensor(p, dtype=torch.long)
                prompt_mask[i, pmax - len(p):] = 1
            completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = 1
        return {k: v.to(self.device) for k, v in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask),
                                                   ("completion_ids", completion_ids),
                                                   ("completion_mask", completion_mask))}

    @torch.no_grad()
    def _token_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs (B, C) of the completions, no gradient, with TRL's kernel and autocast."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logps, _, _ = self.trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, batch["completion_ids"].size(1),
            batch_size=self.config.grpo.micro_batch_size)
        return logps.float()

    @torch.no_grad()
    def _ref_token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.trainer.ref_model is not None:
            return self._token_logps(self.trainer.ref_model, batch)
        from trl.trainer.utils import use_adapter  # LoRA: the adapter-disabled base is the reference (TRL's rule)

        model = self.trainer.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._token_logps(self.model, batch)

    def _advantages(self, samples: Sequence[RolloutSample]) -> tuple[torch.Tensor, list[list[int]], list[bool]]:
        """Group advantages over all kinds of a problem. Returns (A, index lists per group, zero-variance flags)."""
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group_id, []).append(i)
        rewards = torch.tensor([float(s.reward) for s in samples], dtype=torch.float32)
        if not torch.isfinite(rewards).all():
            raise ValueError("rewards must be finite (an unscorable rollout should not reach the update)")
        adv = torch.zeros_like(rewards)
        zero_var: list[bool] = []
        scale = self.config.grpo.scale_rewards
        batch_std = rewards.std() if rewards.numel() > 1 else torch.tensor(0.0)  # Bessel, like TRL's nanstd
        members = list(groups.values())
        for idx in members:
            r = rewards[idx]
            if len(idx) < 2:
                zero_var.append(True)  # a singleton has no baseline (TRL: std NaN -> advantage 0)
                continue
            std = r.std()
            is_zero = bool(torch.isclose(std, torch.zeros_like(std)))
            zero_var.append(is_zero)
            if is_zero:
                continue
            a = r - r.mean()
            if scale == "group":
                a = a / (std + ADV_EPS)
            elif scale == "batch":
                a = a / (batch_std + ADV_EPS)
            adv[idx] = a
        return adv, members, zero_var

    def _prepare(self, samples: Sequence[RolloutSample]) -> _Prepared:
        cfg, g = self.config, self.config.grpo
        off = cfg.lanpo.offpolicy
        n = len(samples)
        if n == 0:
            raise ValueError("step() needs at least one rollout")
        for i, s in enumerate(samples):
            if not s.completion_ids:
                raise ValueError(f"sample {i} (group {s.group_id}) has an empty completion")
            if not s.train_prompt_ids:
                raise ValueError(f"sample {i} (group {s.group_id}) has an empty training prompt")
        adv, members, zero_var = self._advantages(samples)
        off_policy = [s.context_conditioned and cfg.lanpo.train_prompt == "plain" for s in samples]
        weight = torch.ones(n, dtype=torch.float32)
        dropped = 0
        for i in range(n):
            if off_policy[i] and off.negative_advantage == "drop" and adv[i] < 0:
                weight[i] = 0.0
                dropped += 1
        run_all = g.beta > 0
        train_idx = [i for i in range(n) if run_all or (weight[i] != 0 and adv[i] != 0)]
        # longest first: each micro-batch pads to its own maximum, so similar lengths share a micro-batch
        train_idx.sort(key=lambda i: -(len(samples[i].train_prompt_ids) + len(samples[i].completion_ids)))
        mbs = g.micro_batch_size
        chunks = [train_idx[k:k + mbs] for k in range(0, len(train_idx), mbs)]
        batches = [self._pad([samples[i].train_prompt_ids for i in c], [samples[i].completion_ids for i in c])
                   for c in chunks]

        # pi_old under the training prompt: needed for num_iterations > 1 (all sequences) and, as the numerator of
        # the importance weight, for trained off-policy sequences.
        need_is = off.correction == "truncated_is"
        is_idx = [i for i in train_idx if off_policy[i] and weight[i] != 0 and adv[i] != 0 and need_is]
        samp_t: dict[int, torch.Tensor] = {}
        nan_tokens = 0
        for i in is_idx:
            samp = samples[i].sampling_logprobs
            if samp is None or len(samp) != len(samples[i].completion_ids):
                raise ValueError(f"sample {i} (group {samples[i].group_id}): off-policy rollouts need one sampling "
                                 f"log-prob per completion token ({len(samples[i].completion_ids)}), got "
                                 f"{None if samp is None else len(samp)}")
            samp_t[i] = torch.tensor([float("nan") if x is None else float(x) for x in samp], dtype=torch.float32)
            nan_tokens += int((~torch.isfinite(samp_t[i])).sum())
        log_max = math.log(off.max_ratio)
        log_ratios: list[float] = []
        old_logps: list[torch.Tensor | None] = [None] * len(chunks)
        defer_is = g.num_iterations == 1
        if not defer_is:
            # pi_old under the training prompt, once, without gradient: TRL's ratio denominator for every pass, and
            # the importance weight's numerator
            is_set = set(is_idx)
            for k, (c, b) in enumerate(zip(chunks, batches)):
                old_logps[k] = self._token_logps(self.model, b)
                for row, i in enumerate(c):
                    if i in is_set:
                        lp = old_logps[k][row, : len(samples[i].completion_ids)].cpu()
                        ok = torch.isfinite(samp_t[i])  # a token without a sampling log-prob adds 0 (as in TRL)
                        lr_i = float(((lp - torch.where(ok, samp_t[i], 0.0)) * ok).sum())
                        log_ratios.append(lr_i)
                        weight[i] = math.exp(min(lr_i, log_max))

        eff_adv = adv * weight
        total_tokens = sum(len(s.completion_ids) for s in samples)
        spg = self.trainer.args.steps_per_generation
        is_set = set(is_idx)
        micro_batches = []
        mb_tokens = []
        for k, (c, b) in enumerate(zip(chunks, batches)):
            ga_eff = n / len(c)
            inputs = dict(b)
            inputs["advantages"] = eff_adv[c].to(self.device)
            # dapo normalises by num_items_in_batch * current_GA / steps_per_generation: make that the token count
            inputs["num_items_in_batch"] = torch.tensor(total_tokens * spg / ga_eff, dtype=torch.float32,
                                                        device=self.device)
            if old_logps[k] is not None:
                inputs["old_per_token_logps"] = old_logps[k]
            if g.beta > 0:
                inputs["ref_per_token_logps"] = self._ref_token_logps(b)
            inputs["_ga_eff"] = ga_eff
            if defer_is and any(i in is_set for i in c):
                cmax = b["completion_ids"].size(1)
                samp = torch.zeros((len(c), cmax), dtype=torch.float32)
                ok = torch.zeros((len(c), cmax), dtype=torch.bool)
                for row, i in enumerate(c):
                    if i in is_set:
                        fin = torch.isfinite(samp_t[i])
                        samp[row, : len(fin)] = torch.where(fin, samp_t[i], 0.0)
                        ok[row, : len(fin)] = fin
                rows = torch.tensor([i in is_set for i in c])
                inputs["_is"] = (rows.to(self.device), samp.to(self.device), ok.to(self.device))
            micro_batches.append(inputs)
            mb_tokens.append(int(b["completion_mask"].sum()))

        metrics = self._batch_metrics(samples, adv, weight, members, zero_var, off_policy, dropped, nan_tokens,
                                      train_idx, total_tokens)
        return _Prepared(n, micro_batches, mb_tokens, metrics, log_ratios)

    @staticmethod
    def _is_hook(adv: torch.Tensor, rows: torch.Tensor, samp: torch.Tensor, ok: torch.Tensor, log_max: float,
                 sink: list[float]):
        """Scale the advantages of off-policy rows by w = min(exp(sum log pi_old - sum log mu), max_ratio), with
        pi_old = the training forward's own detached log-probs (num_iterations == 1)."""

        def hook(per_token_logps: torch.Tensor) -> None:
            with torch.no_grad():
                log_ratio = ((per_token_logps.detach().float() - samp) * ok).sum(-1)
                w = torch.exp(torch.clamp(log_ratio, max=log_max))
                adv.mul_(torch.where(rows, w, torch.ones_like(w)))
                sink.extend(log_ratio[rows].tolist())

        return hook

    def _forward_backward(self, prep: _Prepared) -> tuple[float, dict[str, float]]:
        """One pass over the micro-batches through TRL's training_step (loss + backward). Returns (loss, metrics)."""
        tr = self.trainer
        tr._metrics["train"].clear()
        total = 0.0
        log_max = math.log(self.config.lanpo.offpolicy.max_ratio)
        for mb in prep.micro_batches:
            inputs = {k: v for k, v in mb.items() if not k.startswith("_")}
            # TRL divides grpo/bnpo/dr_grpo losses by the accumulation count; N / |mb| makes the sum over
            # micro-batches the mean over all N sequences of the step (micro-batches may differ in size).
            tr.current_gradient_accumulation_steps = mb["_ga_eff"]
            if "_is" in mb:
                tr._lanpo_logps_hook = self._is_hook(inputs["advantages"], *mb.pop("_is"), log_max, prep.log_ratios)
            total += float(tr.training_step(self.model, inputs, None))
            if tr._lanpo_logps_hook is not None:
                tr._lanpo_logps_hook = None
                raise RuntimeError("TRL's _compute_loss no longer calls _get_per_token_logps_and_entropies first; "
                                   "the deferred importance weight cannot be applied (set num_iterations > 1)")
        m = tr._metrics["train"]
        out: dict[str, float] = {}
        w = prep.mb_tokens
        wsum = float(sum(w)) or 1.0

        def tok_mean(key: str) -> float | None:
            vals = m.get(key)
            if not vals or len(vals) != len(w):
                return None
            return float(sum(v * t for v, t in zip(vals, w)) / wsum)

        for key, name in (("entropy", "entropy"), ("kl", "kl"), ("clip_ratio/region_mean", "clip_frac/region"),
                          ("clip_ratio/low_mean", "clip_frac/low"), ("clip_ratio/high_mean", "clip_frac/high")):
            v = tok_mean(key)
            if v is not None:
                out[name] = v
        if self.config.grpo.beta == 0:
            out["kl"] = 0.0
        tr._metrics["train"].clear()
        return total, out

    def _batch_metrics(self, samples, adv, weight, members, zero_var, off_policy, dropped, nan_tokens,
                       train_idx, total_tokens) -> dict[str, float]:
        out: dict[str, float] = {}
        rewards = torch.tensor([float(s.reward) for s in samples])
        out["reward/mean"] = float(rewards.mean())
        out["reward/std"] = float(rewards.std()) if len(samples) > 1 else 0.0
        by_kind: dict[str, list[float]] = defaultdict(list)
        for s in samples:
            by_kind[s.kind].append(float(s.reward))
        for kind, vals in sorted(by_kind.items()):
            t = torch.tensor(vals)
            out[f"reward/{kind}/mean"] = float(t.mean())
            out[f"reward/{kind}/std"] = float(t.std()) if len(vals) > 1 else 0.0
            out[f"count/{kind}"] = float(len(vals))
        out["count/context_conditioned"] = float(sum(s.context_conditioned for s in samples))
        out["count/off_policy"] = float(sum(off_policy))
        out["adv/mean"] = float(adv.mean())
        out["adv/std"] = float(adv.std()) if len(samples) > 1 else 0.0
        out["adv/min"] = float(adv.min())
        out["adv/max"] = float(adv.max())
        out["adv/abs_mean"] = float(adv.abs().mean())
        out["groups"] = float(len(members))
        out["zero_variance_groups"] = float(sum(zero_var))
        out["zero_variance_frac"] = float(sum(zero_var)) / max(1, len(members))
        out["dropped_negatives"] = float(dropped)
        out["is/nan_tokens"] = float(nan_tokens)
        out["samples/total"] = float(len(samples))
        out["samples/trained"] = float(len(train_idx))
        out["tokens/total"] = float(total_tokens)
        out["tokens/trained"] = float(sum(len(samples[i].completion_ids) for i in train_idx))
        out["tokens/prompt_trained"] = float(sum(len(samples[i].train_prompt_ids) for i in train_idx))
        return out

    def _is_metrics(self, prep: _Prepared) -> dict[str, float]:
        out: dict[str, float] = {"is/n": float(len(prep.log_ratios))}
        if prep.log_ratios:
            lr = torch.tensor(prep.log_ratios, dtype=torch.float64)
            log_max = math.log(self.config.lanpo.offpolicy.max_ratio)
            w = torch.exp(torch.clamp(lr, max=log_max))
            out["is/log_ratio_mean"] = float(lr.mean())
            out["is/ratio_mean"] = float(torch.exp(torch.clamp(lr, max=50.0)).mean())  # before truncation
            out["is/ratio_max"] = float(torch.exp(torch.clamp(lr.max(), max=50.0)))
            out["is/weight_mean"] = float(w.mean())  # after truncation: what multiplies the advantage
            out["is/weight_min"] = float(w.min())
            out["is/truncated_frac"] = float((lr > log_max).double().mean())
        else:
            out.update({"is/ratio_mean": 1.0, "is/ratio_max": 1.0, "is/weight_mean": 1.0, "is/truncated_frac": 0.0})
        # the advantages after LANPO weighting (also after the deferred importance weights)
        eff = sum(float(mb["advantages"].abs().sum()) for mb in prep.micro_batches)
        out["adv_weighted/abs_mean"] = eff / prep.n_samples
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def _unwrapped(self):
        return self.trainer.accelerator.unwrap_model(self.model)

    def save_checkpoint(self) -> CheckpointInfo:
        """Write `<run_dir>/checkpoints/step-<step_count>` atomically; keep the last `grpo.checkpoint_keep_last`."""
        model = self._unwrapped()
        optimizer_state = self.optimizer.state_dict()
        scheduler_state = self.lr_scheduler.state_dict()
        rng = capture_rng_state()

        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            torch.save(optimizer_state, folder / "optimizer.pt")
            torch.save(scheduler_state, folder / "scheduler.pt")
            torch.save(rng, folder / "rng.pt")

        state = {"optimizer_steps": self.optimizer_steps, "weights": "lora" if self.is_lora else "full",
                 "config_digest": self.config.digest(), "base_model": self.config.model.name_or_path,
                 "global_step": self.trainer.state.global_step}
        info = write_checkpoint(self.run_dir, self.step_count, write, state, self.config.grpo.checkpoint_keep_last)
        self.last_checkpoint = info
        return info

    def load_checkpoint(self, path: str | Path, verify: bool = True) -> CheckpointInfo:
        """Restore weights (or adapter), optimiser, scheduler, RNG states and counters from a checkpoint folder."""
        from safetensors.torch import load_file

        path = Path(path)
        info = verify_checkpoint(path) if verify else checkpoint_info(path)
        state = read_state(path)
        kind = "lora" if self.is_lora else "full"
        if state.get("weights") != kind:
            raise ValueError(f"checkpoint {path} holds {state.get('weights')} weights, this updater trains {kind}")
        model = self._unwrapped()
        if self.is_lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ValueError(f"checkpoint {path}: adapter keys do not match the model: {bad[:3]}")
        else:
            sd: dict[str, torch.Tensor] = {}
            for f in sorted(path.glob("*.safetensors")):
                sd.update(load_file(f))
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
                missing = [k for k in missing if not k.endswith("lm_head.weight")]  # saved once, as the embedding
            if missing or unexpected:
                raise ValueError(f"checkpoint {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        restore_rng_state(torch.load(path / "rng.pt", weights_only=False))  # our own file
        self.step_count = info.step
        self.optimizer_steps = int(state["optimizer_steps"])
        self.trainer.state.global_step = int(state.get("global_step", self.optimizer_steps))
        self.last_checkpoint = info
        return info

    @classmethod
    def resume(cls, config: RunConfig, model, tokenizer, run_dir: str | Path, checkpoint: str | Path | None = None,
               *, require: bool = False, **kwargs) -> "PolicyUpdater":
        """Build an updater and restore `checkpoint` (default: the newest complete one under `run_dir`). Without a
        checkpoint it starts fresh, unless `require=True`. `model` must be the run's *initial* policy (the base
        model under LoRA): its weights are overwritten from the checkpoint."""
        updater = cls(config, model, tokenizer, run_dir, **kwargs)
        target = Path(checkpoint) if checkpoint is not None else None
        if target is None:
            latest = latest_checkpoint(run_dir)
            target = latest.path if latest else None
        if target is None:
            if require:
                raise FileNotFoundError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}")
            return updater
        updater.load_checkpoint(target)
        return updater

    def export_policy(self, folder: str | Path) -> Path:
        """Save the current policy as a standalone HF model folder (LoRA merged into a copy), e.g. for vLLM."""
        import copy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = self._unwrapped()
        if self.is_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder
