"""LANPO policy update (METHOD.md step 8): a GRPO step with TRL on pre-generated, context-conditioned rollouts.

`PolicyUpdater` keeps the policy, TRL trainer, optimiser and scheduler across steps; `step(samples)` takes a step's
finished `RolloutSample`s and updates the policy in place. This module is the TRL plumbing: the LANPO rules are
pure functions in loss.py, the per-token log-probs come from logprobs.py. How TRL is used and how the loss departs
from textbook GRPO, with the formulas: docs/update.md. Constructing a `PolicyUpdater` re-seeds python/numpy/torch
with `config.seed` (TRL's trainer does it).
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import (
    CheckpointDamaged,
    CheckpointInfo,
    CheckpointWriter,
    capture_rng_state,
    checkpoint_info,
    checkpoint_path,
    copy_tensor,
    latest_checkpoint,
    read_state,
    restore_rng_state,
    tensors_checksum,
    torch_save_fast,
    verify_checkpoint,
    write_checkpoint,
)
from .config import RunConfig
from .hardware import resolve_bf16
from .logprobs import completion_logps
from .loss import (CORRECTIONS, baseline_advantages, dropped_negatives, effective_sample_size_frac, group_members,
                   has_signal, kind_diagnostics, needs_sampling_logps, offpolicy_weight, plain_baseline_members,
                   sequence_log_ratio, token_log_ratio)

log = logging.getLogger(__name__)


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
        """GRPOTrainer fed with finished micro-batches (docs/update.md, "How TRL is used")."""

        _lanpo_logps_hook = None  # set by PolicyUpdater right before a micro-batch's training_step

        def _prepare_inputs(self, generation_batch):
            # TRL generates, scores, computes advantages, shuffles and buffers here. LANPO rollouts are generated and
            # scored upstream and PolicyUpdater._prepare builds complete micro-batches (advantages already weighted),
            # so the micro-batch passes through unchanged.
            return generation_batch

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            causal_lm = self._lanpo_causal_lm(model)
            if causal_lm is None or compute_aux_loss or any(v is not None for v in multimodal.values()):
                out = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            else:
                rows = batch_size or input_ids.size(0)
                parts = [completion_logps(causal_lm, input_ids[k:k + rows], attention_mask[k:k + rows],
                                          logits_to_keep, temperature=self.temperature,
                                          compute_entropy=compute_entropy, autocast=self.accelerator.autocast)
                         for k in range(0, input_ids.size(0), rows)]
                entropies = torch.cat([e for _, e in parts]) if compute_entropy else None
                out = (torch.cat([lp for lp, _ in parts]), entropies, None)
            # With num_iterations == 1 the importance weight's numerator, log pi_old(y|q_plain), is exactly the
            # (detached) log-prob that _compute_loss computes here as its first step, so instead of a second forward
            # pass the hook turns it into w and scales the micro-batch's advantages in place; _compute_loss reads
            # inputs["advantages"] only after this call (TRL 1.16; the reference test fails if that changes).
            hook, self._lanpo_logps_hook = self._lanpo_logps_hook, None
            if hook is not None:
                hook(out[0])
            return out

        def _lanpo_causal_lm(self, model):
            """The causal LM to score with `completion_logps`, or None where TRL's own kernel must run (an entropy
            bonus needs the entropy's gradient; scaled or soft-capped logits; an adapter on the LM head)."""
            from accelerate.utils import is_peft_model

            causal_lm = self.accelerator.unwrap_model(model)
            if is_peft_model(causal_lm):
                causal_lm = causal_lm.get_base_model()
            text_config = causal_lm.config.get_text_config()
            scaled = any(getattr(text_config, name, None) is not None for name in _LOGIT_TRANSFORMS)
            plain_head = type(causal_lm.get_output_embeddings()) is torch.nn.Linear
            if self._entropy_bonus_enabled or scaled or not plain_head:
                return None
            return causal_lm

    return _LanpoGRPOTrainer


# config fields by which some models transform their logits; TRL's kernel applies them, `completion_logps` does not
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _unused_reward(completions, **kwargs):  # GRPOTrainer wants a reward function; rewards come with the samples
    return [0.0] * len(completions)


def build_grpo_args(config: RunConfig, output_dir: str | Path, **overrides: Any):
    """TRL `GRPOConfig` mirroring our config (also used by the benchmark and tests for vanilla TRL)."""
    from trl import GRPOConfig

    grpo = config.grpo
    scheduler = grpo.lr_scheduler
    if scheduler == "constant" and grpo.warmup_steps > 0:
        scheduler = "constant_with_warmup"
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=grpo.micro_batch_size,
        gradient_accumulation_steps=1,
        num_generations=2,  # generation is not done by the trainer here; 2 just satisfies GRPOConfig's checks
        steps_per_generation=2,
        max_completion_length=config.rollout.max_new_tokens,
        temperature=config.trainer_temperature(),
        learning_rate=grpo.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=grpo.warmup_steps,
        weight_decay=grpo.weight_decay,
        max_grad_norm=grpo.max_grad_norm,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high,
        beta=grpo.beta,
        num_iterations=grpo.num_iterations,
        max_steps=max(1, grpo.steps * grpo.num_iterations),
        bf16=resolve_bf16(grpo.bf16),
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
class _OffPolicyRows:
    """What the importance weight of a micro-batch's off-policy rows needs besides the rows' own log-probs."""

    rows: torch.Tensor
    """(B,) bool: the rows that get a weight."""
    index: list[int]
    """Per row, the index of its sample among the step's update samples (the weights are reported per kind)."""
    sampling_logps: torch.Tensor
    """(B, C) log mu per completion token; NaN where unknown, and on padding and rows without a weight."""
    mask: torch.Tensor
    """(B, C) completion mask."""


@dataclass
class _MicroBatch:
    inputs: dict[str, torch.Tensor]
    """TRL's inputs. `advantages` are w * A; the weights of `offpolicy` rows are multiplied in once known."""
    accumulation_steps: float
    """N / (|micro-batch| x ranks), |micro-batch| counting padding rows where TRL's loss does (grpo, dr_grpo). TRL
    divides grpo/bnpo/dr_grpo losses by its accumulation count, so this makes the sum over micro-batches, averaged
    over ranks, the mean over all N sequences of the step (micro-batches may differ in size)."""
    tokens: int
    """Completion tokens of the micro-batch's round: itself and the micro-batches the other ranks run beside it (TRL
    reduces its logged token means over the ranks)."""
    offpolicy: _OffPolicyRows | None
    """Rows whose weight comes from this micro-batch's training forward (num_iterations == 1); cleared once used."""


@dataclass
class _Prepared:
    n_samples: int
    micro_batches: list[_MicroBatch]
    metrics: dict[str, float]
    log_ratios: dict[int, float]
    """Per weighted off-policy sequence (by update-sample index): log pi_old(y|q_train) - log mu(y|q_sample), filled
    in the training forward when the weight is computed there."""
    is_weights: dict[int, float]
    """The weight applied to those sequences (its token mean, `OffPolicyWeight.sequence`), filled with
    `log_ratios`."""
    truncated: dict[int, float]
    """Their share of capped tokens, filled with `log_ratios`."""
    kinds: list[str]
    """Per update sample, its kind (for the per-kind metrics)."""
    advantages: torch.Tensor
    """(N,) raw advantages A, before any weight."""
    dropped: torch.Tensor
    """(N,) bool: dropped negatives (w = 0)."""

    def final_weights(self) -> torch.Tensor:
        """(N,) the w that multiplies each advantage: 0 for a dropped negative, the off-policy weight (token mean)
        where one was applied, else 1. Complete only after the first pass when the weights come from the training forward."""
        w = (~self.dropped).double()
        for i, value in self.is_weights.items():
            w[i] = value
        return w


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
        grpo = config.grpo
        peft_config = None
        if config.model.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            lora = config.model.lora
            peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=lora.target_modules, task_type="CAUSAL_LM")
        args = build_grpo_args(config, self.run_dir / "trl")
        trainer_cls = _make_trainer_class()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rollout_func.*")
            self.trainer = trainer_cls(model=model, reward_funcs=_unused_reward, args=args,
                                       train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
                                       processing_class=tokenizer, peft_config=peft_config)
        if ref_model is not None and grpo.beta > 0 and not self.is_lora:
            # TRL loaded its own copy from `model.config._name_or_path`; an explicit reference replaces it
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(ref_model, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            ref_model.to(self.trainer.accelerator.device).eval().requires_grad_(False)
            self.trainer.ref_model = ref_model
        if grpo.gradient_checkpointing:
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
        """The newest checkpoint known to be complete on disk."""
        self._checkpoint_writer = CheckpointWriter()
        self._tokenizer_files: dict[str, bytes] | None = None

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

    @property
    def shard(self) -> tuple[int, int]:
        """(this process's rank, ranks): (0, 1) in one process; under `accelerate launch` each rank runs its share of
        a step's micro-batches and the gradients are averaged over the ranks (lanpo_core/trainer.py)."""
        accelerator = self.trainer.accelerator
        return accelerator.process_index, accelerator.num_processes

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
            loss, metrics_of_pass = self._forward_backward(prep)
            if trained:
                loss = self._average_gradients(params, loss)
            losses.append(loss)
            pass_metrics.append(metrics_of_pass)
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
        self._gather_offpolicy(prep)
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
        loss, metrics_of_pass = self._forward_backward(prep)
        if prep.micro_batches:
            loss = self._average_gradients([p for p in self.model.parameters() if p.requires_grad], loss)
        self._gather_offpolicy(prep)
        out = dict(prep.metrics)
        out.update(metrics_of_pass)
        out.update(self._is_metrics(prep))
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _pad(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        pmax = max(len(p) for p in prompts)
        # padding rows alone get two columns: TRL's metrics read a (B, 1) tensor as one value per sequence
        cmax = max(len(c) for c in completions) or 2
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

    def _sampling_logps(self, samples: Sequence[RolloutSample], i: int) -> torch.Tensor:
        """Sample i's sampling log-probs as a tensor, None -> NaN; it must have one per completion token."""
        values, n_tokens = samples[i].sampling_logprobs, len(samples[i].completion_ids)
        if values is None or len(values) != n_tokens:
            raise ValueError(f"sample {i} (group {samples[i].group_id}): off-policy rollouts need one sampling "
                             f"log-prob per completion token ({n_tokens}), got {None if values is None else len(values)}")
        return torch.tensor([float("nan") if x is None else float(x) for x in values], dtype=torch.float32)

    def _advantages(self, samples: Sequence[RolloutSample]):
        """The advantage rules (loss.py) on update samples: (groups, A, zero-variance and baseline-fallback flags
        per group, off-policy and dropped-negative flags per sample)."""
        grpo, lanpo = self.config.grpo, self.config.lanpo
        rewards = torch.tensor([float(s.reward) for s in samples], dtype=torch.float32)
        if not torch.isfinite(rewards).all():
            raise ValueError("rewards must be finite (an unscorable rollout should not reach the update)")
        groups = group_members([s.group_id for s in samples])
        if lanpo.baseline == "plain_only":
            baselines = plain_baseline_members(groups, [not s.context_conditioned for s in samples])
        elif lanpo.baseline == "group":
            baselines = groups
        else:
            raise ValueError(f"lanpo.baseline: expected group or plain_only, got {lanpo.baseline!r}")
        advantages, zero_variance, fallback = baseline_advantages(rewards, groups, baselines, grpo.scale_rewards)
        off_policy = torch.tensor([s.context_conditioned and lanpo.train_prompt == "plain" for s in samples],
                                  dtype=torch.bool)
        dropped = dropped_negatives(advantages, off_policy, lanpo.offpolicy.negative_advantage)
        return groups, advantages, zero_variance, fallback, off_policy, dropped

    @torch.no_grad()
    def offpolicy_diagnostics(self, samples: Sequence[RolloutSample], corrections: Sequence[str] = CORRECTIONS
                              ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
        """What each off-policy estimator would give on a step's samples, without training. One no-grad forward
        of every sample with sampling log-probs, under its training prompt, with the trainer's kernel and precision
        at the current weights (pi_old). Returns

        * per correction, per kind: `loss.kind_diagnostics`, plus `weight_mean_all` and `ess_frac_all` over all the
          kind's weighted sequences whatever their advantage, and `truncated_frac` over the trained ones (as the
          update logs it);
        * per kind, the log-ratio log pi_old(y|q_train) - log mu(y|q_sample): `token_mean` (per token) and
          `sequence_median`. For plain rollouts (same prompt) it measures the engine-trainer mismatch alone, which
          should be ~0: a temperature or precision mismatch shows here first."""
        setting = self.config.lanpo.offpolicy
        self.model.train()
        _, advantages, _, _, off_policy, dropped = self._advantages(samples)
        kinds = [s.kind for s in samples]
        scored = [i for i, s in enumerate(samples) if s.sampling_logprobs is not None]
        train: dict[int, torch.Tensor] = {}
        size = self.config.grpo.micro_batch_size
        for k in range(0, len(scored), size):
            rows = scored[k:k + size]
            batch = self._pad([samples[i].train_prompt_ids for i in rows], [samples[i].completion_ids for i in rows])
            logps = self._token_logps(self.model, batch)
            for row, i in enumerate(rows):
                train[i] = logps[row, : len(samples[i].completion_ids)].cpu()
        sampling = {i: self._sampling_logps(samples, i) for i in scored}
        ratios: dict[str, dict[str, float]] = {}
        for kind in sorted(set(kinds)):
            mine = [i for i in scored if kinds[i] == kind]
            if mine:
                deltas = [token_log_ratio(train[i], sampling[i], torch.ones(len(train[i]))) for i in mine]
                ratios[kind] = {"token_mean": float(torch.cat(deltas).mean()),
                                "sequence_median": float(torch.stack([d.sum() for d in deltas]).median())}
        weighted = [i for i in off_policy.nonzero()[:, 0].tolist() if i in train]
        if len(weighted) < int(off_policy.sum()):
            raise ValueError("offpolicy_diagnostics: every off-policy sample needs sampling log-probs")
        estimators: dict[str, dict[str, dict[str, float]]] = {}
        for correction in corrections:
            estimated = {i: offpolicy_weight(correction, train[i][None], sampling[i][None],
                                             torch.ones(1, len(train[i])), setting.max_ratio, setting.shaping_gamma)
                         for i in weighted}
            w = (~dropped).double()
            for i, weight in estimated.items():
                if not dropped[i]:
                    w[i] = float(weight.sequence[0])
            figures = kind_diagnostics(kinds, advantages, w, dropped)
            for kind, row in figures.items():
                every = torch.tensor([float(estimated[i].sequence[0]) for i in weighted if kinds[i] == kind],
                                     dtype=torch.float64)
                trained = [float(estimated[i].truncated_frac[0]) for i in weighted
                           if kinds[i] == kind and advantages[i] != 0 and not dropped[i]]
                row["weight_mean_all"] = float(every.mean()) if every.numel() else 1.0
                row["ess_frac_all"] = effective_sample_size_frac(every)
                row["truncated_frac"] = sum(trained) / len(trained) if trained else 0.0
            estimators[correction] = figures
        return estimators, ratios

    def _prepare(self, samples: Sequence[RolloutSample]) -> _Prepared:
        """The LANPO rules (loss.py) on a step's rollouts: advantages, weights and padded micro-batches for TRL."""
        grpo, lanpo = self.config.grpo, self.config.lanpo
        correction = lanpo.offpolicy.correction
        n = len(samples)
        scored, left_out = samples, 0
        if not lanpo.context_in_update:  # not update samples at all: dropped before advantages and normaliser
            kept = [s for s in samples if not s.context_conditioned]
            left_out, samples = n - len(kept), kept
            n = len(samples)
        if n == 0:  # every group unusable or refused: nothing to train, the step still counts (like zero variance)
            return _Prepared(0, [], {"samples/total": 0.0, "samples/trained": 0.0, "tokens/total": 0.0,
                                     "samples/context_left_out": float(left_out)}, {}, {}, [],
                             {}, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        for i, s in enumerate(samples):
            if not s.completion_ids:
                raise ValueError(f"sample {i} (group {s.group_id}) has an empty completion")
            if not s.train_prompt_ids:
                raise ValueError(f"sample {i} (group {s.group_id}) has an empty training prompt")
        groups, advantages, zero_variance, fallback, off_policy, dropped = self._advantages(samples)
        signal = has_signal(advantages, dropped)
        weighted_advantages = advantages * (~dropped).float()  # w = 0 for a dropped negative, else 1 so far
        # the off-policy sequences whose w needs log pi_old(y|q_train) - log mu(y|q_sample)
        corrected = off_policy & signal & needs_sampling_logps(correction)
        sampling_logps = {i: self._sampling_logps(samples, i) for i in corrected.nonzero()[:, 0].tolist()}
        nan_tokens = sum(int((~torch.isfinite(t)).sum()) for t in sampling_logps.values())

        # with a KL term every sequence has a gradient; without one, sequences without signal are not run
        trained = torch.ones(n, dtype=torch.bool) if grpo.beta > 0 else signal
        trained_idx = trained.nonzero()[:, 0].tolist()
        # longest first: each micro-batch pads to its own maximum, so similar lengths share a micro-batch
        trained_idx.sort(key=lambda i: -(len(samples[i].train_prompt_ids) + len(samples[i].completion_ids)))
        size = grpo.micro_batch_size
        chunks = [trained_idx[k:k + size] for k in range(0, len(trained_idx), size)]
        # Several ranks: round r runs micro-batches r*ranks .. r*ranks + ranks-1, one per rank (similar lengths, as
        # they are sorted). TRL's loss gathers per-sequence metrics over the ranks at every micro-batch, so within a
        # round every rank runs one with the same number of rows: shorter ones (and a rank without one in the last
        # round) get padding rows, one prompt token and no completion token, which add nothing to loss or gradient.
        rank, ranks = self.shard
        rounds = [chunks[k:k + ranks] for k in range(0, len(chunks), ranks)]

        total_tokens = sum(len(s.completion_ids) for s in samples)
        steps_per_generation = self.trainer.args.steps_per_generation
        weight_in_forward = grpo.num_iterations == 1
        log_ratios: dict[int, float] = {}
        is_weights: dict[int, float] = {}
        truncated: dict[int, float] = {}
        micro_batches = []
        for round_chunks in rounds:
            round_tokens = sum(len(samples[i].completion_ids) for rows in round_chunks for i in rows)
            rows = round_chunks[rank] if rank < len(round_chunks) else []
            padding = max(len(c) for c in round_chunks) - len(rows)
            batch = self._pad([samples[i].train_prompt_ids for i in rows] + [[self.pad_id]] * padding,
                              [samples[i].completion_ids for i in rows] + [[]] * padding)
            inputs = dict(batch)
            # (B, C): TRL accepts per-token advantages, which a per-token off-policy weight needs
            width = batch["completion_ids"].size(1)
            row_advantages = torch.cat([weighted_advantages[rows], torch.zeros(padding)])
            inputs["advantages"] = row_advantages[:, None].expand(-1, width).contiguous().to(self.device)
            # grpo and dr_grpo divide by the rows TRL sees (padding included), bnpo by the micro-batch's tokens
            divisor = len(rows) + padding if grpo.loss_type in ("grpo", "dr_grpo") else max(1, len(rows))
            accumulation_steps = n / (divisor * ranks)
            # dapo normalises by num_items_in_batch * current accumulation count / steps_per_generation: make that
            # the step's completion-token count
            inputs["num_items_in_batch"] = torch.tensor(total_tokens * steps_per_generation / accumulation_steps,
                                                        dtype=torch.float32, device=self.device)
            if grpo.beta > 0:
                inputs["ref_per_token_logps"] = self._ref_token_logps(batch)
            offpolicy_rows = self._offpolicy_rows(rows, corrected, sampling_logps, batch)
            if not weight_in_forward:
                # pi_old under the training prompt, once, without gradient: TRL's ratio denominator for every pass,
                # and the numerator of the importance weight
                inputs["old_per_token_logps"] = self._token_logps(self.model, batch)
                if offpolicy_rows is not None:
                    self._apply_offpolicy_weights(inputs["advantages"], inputs["old_per_token_logps"],
                                                  offpolicy_rows, log_ratios, is_weights, truncated)
                    offpolicy_rows = None
            micro_batches.append(_MicroBatch(inputs, accumulation_steps, round_tokens, offpolicy_rows))

        metrics = self._batch_metrics(scored, samples, advantages, groups, zero_variance, off_policy, dropped,
                                      nan_tokens, trained_idx, total_tokens)
        metrics["baseline_fallback_groups"] = float(fallback.sum())
        metrics["samples/context_left_out"] = float(left_out)
        return _Prepared(n, micro_batches, metrics, log_ratios, is_weights, truncated, [s.kind for s in samples],
                         advantages, dropped)

    def _average_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Average the gradients and the pass's loss over the ranks (nothing to do in one process), as DDP does: each
        rank's losses are scaled by the ranks (`_MicroBatch.accumulation_steps`), so the average is the gradient of
        the whole step, the one a single process computes. A parameter no rank has a gradient for keeps none (AdamW
        skips it, as in one process). Returns the step's loss."""
        ranks = self.shard[1]
        if ranks == 1:
            return loss
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        present = torch.tensor([p.grad is not None for p in params] + [False], dtype=torch.float64,
                               device=self.device)
        present[-1] = loss
        dist.all_reduce(present)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= ranks
        for p, g, used in zip(params, _unflatten_dense_tensors(flat, grads), present[:-1].tolist()):
            p.grad = g if used else None
        return float(present[-1]) / ranks

    def _gather_offpolicy(self, prep: _Prepared) -> None:
        """Under several ranks, give every rank the importance weights the others computed for their rows (the
        per-kind metrics read them)."""
        if self.shard[1] == 1:
            return
        import torch.distributed as dist

        parts: list[Any] = [None] * self.shard[1]
        dist.all_gather_object(parts, (prep.log_ratios, prep.is_weights, prep.truncated))
        for log_ratios, is_weights, truncated in parts:
            prep.log_ratios.update(log_ratios)
            prep.is_weights.update(is_weights)
            prep.truncated.update(truncated)

    def _offpolicy_rows(self, rows: list[int], corrected: torch.Tensor, sampling_logps: dict[int, torch.Tensor],
                        batch: dict[str, torch.Tensor]) -> _OffPolicyRows | None:
        """The padded sampling log-probs of a micro-batch's corrected rows, or None if it has none."""
        selected = torch.zeros(batch["completion_ids"].size(0), dtype=torch.bool)  # padding rows: never weighted
        selected[: len(rows)] = corrected[rows]
        if not selected.any():
            return None
        padded = torch.full(tuple(batch["completion_ids"].shape), float("nan"), dtype=torch.float32)
        for row, i in enumerate(rows):
            if i in sampling_logps:
                padded[row, : len(sampling_logps[i])] = sampling_logps[i]
        return _OffPolicyRows(selected.to(self.device), list(rows), padded.to(self.device), batch["completion_mask"])

    def _apply_offpolicy_weights(self, advantages: torch.Tensor, train_logps: torch.Tensor, offpolicy: _OffPolicyRows,
                                 log_ratios: dict[int, float], is_weights: dict[int, float],
                                 truncated: dict[int, float]) -> None:
        """advantages (B, C) *= w_t on the off-policy rows, w = loss.offpolicy_weight, with log pi_old =
        `train_logps` (the training forward's own detached log-probs when num_iterations == 1). Records each row's
        sequence log-ratio, mean weight and capped share under its sample index."""
        setting = self.config.lanpo.offpolicy
        with torch.no_grad():
            train_logps = train_logps.detach()
            log_ratio = sequence_log_ratio(train_logps, offpolicy.sampling_logps, offpolicy.mask)
            weight = offpolicy_weight(setting.correction, train_logps, offpolicy.sampling_logps, offpolicy.mask,
                                      setting.max_ratio, setting.shaping_gamma)
            advantages.mul_(torch.where(offpolicy.rows[:, None], weight.tokens, 1.0))
            for row in offpolicy.rows.nonzero()[:, 0].tolist():
                i = offpolicy.index[row]
                log_ratios[i] = float(log_ratio[row])
                is_weights[i] = float(weight.sequence[row])
                truncated[i] = float(weight.truncated_frac[row])

    def _forward_backward(self, prep: _Prepared) -> tuple[float, dict[str, float]]:
        """One pass over the micro-batches through TRL's training_step (loss + backward). Returns (loss, metrics)."""
        trainer = self.trainer
        trainer._metrics["train"].clear()
        total = 0.0
        for mb in prep.micro_batches:
            trainer.current_gradient_accumulation_steps = mb.accumulation_steps
            if mb.offpolicy is not None:
                rows, mb.offpolicy = mb.offpolicy, None
                trainer._lanpo_logps_hook = functools.partial(self._apply_offpolicy_weights, mb.inputs["advantages"],
                                                              offpolicy=rows, log_ratios=prep.log_ratios,
                                                              is_weights=prep.is_weights, truncated=prep.truncated)
            total += float(trainer.training_step(self.model, dict(mb.inputs), None))
            if trainer._lanpo_logps_hook is not None:
                trainer._lanpo_logps_hook = None
                raise RuntimeError("TRL's _compute_loss no longer calls _get_per_token_logps_and_entropies first; "
                                   "the deferred importance weight cannot be applied (set num_iterations > 1)")
        logged = trainer._metrics["train"]
        out: dict[str, float] = {}
        tokens = [mb.tokens for mb in prep.micro_batches]
        token_sum = float(sum(tokens)) or 1.0

        def tok_mean(key: str) -> float | None:  # TRL logs one token mean per micro-batch
            vals = logged.get(key)
            if not vals or len(vals) != len(tokens):
                return None
            return float(sum(v * t for v, t in zip(vals, tokens)) / token_sum)

        for key, name in (("entropy", "entropy"), ("kl", "kl"), ("clip_ratio/region_mean", "clip_frac/region"),
                          ("clip_ratio/low_mean", "clip_frac/low"), ("clip_ratio/high_mean", "clip_frac/high")):
            v = tok_mean(key)
            if v is not None:
                out[name] = v
        if self.config.grpo.beta == 0:
            out["kl"] = 0.0
        trainer._metrics["train"].clear()
        return total, out

    def _batch_metrics(self, scored, samples, adv, members, zero_var, off_policy, dropped, nan_tokens, train_idx,
                       total_tokens) -> dict[str, float]:
        """Rewards and counts of every `scored` rollout (also those left out of the update), the rest of the update
        `samples`."""
        out: dict[str, float] = {}
        rewards = torch.tensor([float(s.reward) for s in scored])
        out["reward/mean"] = float(rewards.mean())
        out["reward/std"] = float(rewards.std()) if len(scored) > 1 else 0.0
        by_kind: dict[str, list[float]] = defaultdict(list)
        for s in scored:
            by_kind[s.kind].append(float(s.reward))
        for kind, vals in sorted(by_kind.items()):
            t = torch.tensor(vals)
            out[f"reward/{kind}/mean"] = float(t.mean())
            out[f"reward/{kind}/std"] = float(t.std()) if len(vals) > 1 else 0.0
            out[f"count/{kind}"] = float(len(vals))
        out["count/context_conditioned"] = float(sum(s.context_conditioned for s in scored))
        out["count/off_policy"] = float(sum(off_policy))
        out["adv/mean"] = float(adv.mean())
        out["adv/std"] = float(adv.std()) if len(samples) > 1 else 0.0
        out["adv/min"] = float(adv.min())
        out["adv/max"] = float(adv.max())
        out["adv/abs_mean"] = float(adv.abs().mean())
        out["groups"] = float(len(members))
        out["zero_variance_groups"] = float(sum(zero_var))
        out["zero_variance_frac"] = float(sum(zero_var)) / max(1, len(members))
        out["dropped_negatives"] = float(dropped.sum())
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
            lr = torch.tensor(list(prep.log_ratios.values()), dtype=torch.float64)
            w = torch.tensor(list(prep.is_weights.values()), dtype=torch.float64)
            out["is/log_ratio_mean"] = float(lr.mean())
            # the raw sequence ratio, whatever the estimator
            out["is/ratio_mean"] = float(torch.exp(torch.clamp(lr, max=50.0)).mean())
            out["is/ratio_max"] = float(torch.exp(torch.clamp(lr.max(), max=50.0)))
            out["is/weight_mean"] = float(w.mean())  # the estimator's weight (token mean): what multiplies A
            out["is/weight_min"] = float(w.min())
            out["is/truncated_frac"] = sum(prep.truncated.values()) / len(prep.truncated)
        else:
            out.update({"is/ratio_mean": 1.0, "is/ratio_max": 1.0, "is/weight_mean": 1.0, "is/truncated_frac": 0.0})
        # the advantages after LANPO weighting (also after the deferred importance weights)
        eff = float((prep.advantages.double() * prep.final_weights()).abs().sum()) if prep.n_samples else 0.0
        out["adv_weighted/abs_mean"] = eff / max(1, prep.n_samples)
        out.update(self._kind_metrics(prep))
        return out

    def _kind_metrics(self, prep: _Prepared) -> dict[str, float]:
        """Per rollout kind, how much of the update it carries (docs/update.md, "Per-kind diagnostics"); read after
        the first pass, when every importance weight is known. Logs a warning when the context kinds together carry
        less than `lanpo.offpolicy.min_context_mass_frac` of the plain kind's weight mass."""
        out: dict[str, float] = {}
        if prep.n_samples == 0:
            return out
        setting = self.config.lanpo.offpolicy
        mass: dict[str, float] = {}
        for kind, figures in kind_diagnostics(prep.kinds, prep.advantages, prep.final_weights(), prep.dropped).items():
            weighted = [i for i, k in enumerate(prep.kinds) if k == kind and i in prep.truncated]
            figures["truncated_frac"] = sum(prep.truncated[i] for i in weighted) / len(weighted) if weighted else 0.0
            out.update({f"kind/{kind}/{name}": value for name, value in figures.items()})
            mass[kind] = figures["weight_mass"]
        context = {k: v for k, v in mass.items() if k != "plain"}
        plain_mass = mass.get("plain", 0.0)
        if context and sum(context.values()) < setting.min_context_mass_frac * plain_mass:
            log.warning("context kinds %s carry weight mass %.4g (%s), below lanpo.offpolicy.min_context_mass_frac="
                        "%g of the plain kind's %.4g", "+".join(sorted(context)), sum(context.values()),
                        ", ".join(f"{k} {v:.4g}" for k, v in sorted(context.items())),
                        setting.min_context_mass_frac, plain_mass)
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def _unwrapped(self):
        return self.trainer.accelerator.unwrap_model(self.model)

    def _weights_snapshot(self, model, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(state dict for `save_pretrained(state_dict=...)`, the tensors it writes, under their file names), with
        every tensor that training changes copied when `copy` (else the live tensors)."""
        copy_tensor_ = copy_tensor if copy else (lambda t: t)
        live = model.state_dict()
        if self.is_lora:
            from peft import get_peft_model_state_dict

            # the base weights are frozen, so only the trainable tensors (the adapter) need a copy
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            sd = {k: copy_tensor_(v) if k in trainable else v for k, v in live.items()}
            # the same selection and renaming PeftModel.save_pretrained applies to the state dict it is given
            return sd, get_peft_model_state_dict(model, state_dict=sd, adapter_name=model.active_adapter)
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        # tied aliases (lm_head = embedding) go before copying, as save_pretrained drops them, so each is copied once
        sd = {k: copy_tensor_(v) for k, v in remove_tied_weights_from_state_dict(dict(live), model).items()}
        return sd, revert_weight_conversion(model, dict(sd))

    @staticmethod
    def _copy_state(obj):
        """Deep copy of a (nested) state dict; tensors are cloned."""
        if isinstance(obj, torch.Tensor):
            return copy_tensor(obj)
        if isinstance(obj, dict):
            return {k: PolicyUpdater._copy_state(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(PolicyUpdater._copy_state(v) for v in obj)
        import copy

        return copy.deepcopy(obj)

    def _tokenizer_snapshot(self) -> dict[str, bytes]:
        # Rendered once: the tokenizer does not change during a run, and a fast tokenizer must not be serialised in
        # the write thread while this one encodes prompts ("Already borrowed").
        if self._tokenizer_files is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                self._tokenizer_files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        return self._tokenizer_files

    def save_checkpoint(self, background: bool = False) -> CheckpointInfo:
        """Write `<run_dir>/checkpoints/step-<step_count>` atomically; keep the last `grpo.checkpoint_keep_last`.

        With `background=True` everything the checkpoint holds (weights or adapter, optimiser and scheduler state, RNG
        states, counters) is copied and its checksum computed before this returns, so the caller may change the
        weights at once, and the files are written in a thread: the returned info (final path, checksum) is valid,
        but the folder exists only after `wait_checkpoint()`. In the foreground the live tensors are written, without
        copies. Waits for (and re-raises the error of) a pending write."""
        self.wait_checkpoint()
        model = self._unwrapped()
        weights, written = self._weights_snapshot(model, copy=background)
        checksum = tensors_checksum(written)
        del written
        # the optimiser's state dict holds the live moment tensors
        optimizer_state = self._copy_state(self.optimizer.state_dict()) if background else self.optimizer.state_dict()
        scheduler_state = self._copy_state(self.lr_scheduler.state_dict())
        rng = capture_rng_state()
        tokenizer_files = self._tokenizer_snapshot()

        def write(folder: Path) -> None:
            # save_pretrained only reads the model's config here; the tensors come from the snapshot
            model.save_pretrained(folder, state_dict=weights)
            for name, data in tokenizer_files.items():
                (folder / name).write_bytes(data)
            torch_save_fast(optimizer_state, folder / "optimizer.pt")
            torch_save_fast(scheduler_state, folder / "scheduler.pt")
            torch_save_fast(rng, folder / "rng.pt")

        state = {"optimizer_steps": self.optimizer_steps, "weights": "lora" if self.is_lora else "full",
                 "config_digest": self.config.digest(), "base_model": self.config.model.name_or_path,
                 "global_step": self.trainer.state.global_step}
        step = self.step_count
        job = functools.partial(write_checkpoint, self.run_dir, step, write, state,
                                self.config.grpo.checkpoint_keep_last, checksum=checksum)
        info = self._checkpoint_writer.submit(CheckpointInfo(checkpoint_path(self.run_dir, step), step, checksum),
                                              job, background)
        if not background:
            self.last_checkpoint = info
        return info

    def wait_checkpoint(self) -> CheckpointInfo | None:
        """Block until a pending background write is on disk and return it (None if none is pending). Raises
        `CheckpointWriteError` (naming the folder) if it failed; nothing was published under that name then."""
        info = self._checkpoint_writer.wait()
        if info is not None:
            self.last_checkpoint = info
        return info

    def load_checkpoint(self, path: str | Path, verify: bool = True, weights_only: bool = False) -> CheckpointInfo:
        """Restore weights (or adapter), optimiser, scheduler, RNG states and counters from a checkpoint folder; only
        the weights with `weights_only` (a process that serves the weights of a trainer elsewhere and never steps).
        Waits for a pending background write first (it may be the folder asked for). A checkpoint whose weights do
        not match its checksum (`verify`), or whose files cannot be read, raises `CheckpointDamaged` before anything
        is restored."""
        import pickle

        from safetensors.torch import load_file

        self.wait_checkpoint()
        path = Path(path)
        info = verify_checkpoint(path) if verify else checkpoint_info(path)
        state = read_state(path)

        def load_pt(name: str, **kwargs):
            # read before anything is restored: a damaged file must not leave half a state behind
            try:
                return torch.load(path / name, **kwargs)
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
                raise CheckpointDamaged(path, info.step, f"{name} is unreadable ({type(e).__name__}: "
                                                         f"{str(e).splitlines()[0] if str(e) else ''})") from None

        if not weights_only:
            # a CPU rank's device is cpu:<rank>, a location torch.load cannot restore saved tensors to
            location = "cpu" if self.device.type == "cpu" else self.device
            optimizer_state = load_pt("optimizer.pt", map_location=location, weights_only=True)
            scheduler_state = load_pt("scheduler.pt", weights_only=False)
            rng_state = load_pt("rng.pt", weights_only=False)  # our own file
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
        if weights_only:
            return info
        self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(scheduler_state)
        restore_rng_state(rng_state)
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
