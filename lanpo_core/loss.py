"""The parts of the LANPO loss that TRL's GRPO loss cannot express, as pure tensor functions (METHOD.md step 8).

update.py hands TRL the weighted advantage A'_i = w_i * A_i of every sequence; TRL's clipped per-token loss and its
aggregation do the rest. The formulas and why they depart from textbook GRPO: docs/update.md. An off-policy
correction is one branch of `offpolicy_weight`, named like its `lanpo.offpolicy.correction` value.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

ADV_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)


def group_members(group_ids: Sequence[str]) -> list[list[int]]:
    """Indices of each group's members, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, group_id in enumerate(group_ids):
        groups.setdefault(group_id, []).append(i)
    return list(groups.values())


def group_advantages(rewards: torch.Tensor, groups: list[list[int]], scale_rewards: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean_g r) / (s + eps) over the group g of i: all rollouts of one problem, of every kind.

    s = std_g r (Bessel-corrected, as TRL) for `scale_rewards: group`, std r over the whole batch for `batch`, and
    no division for `none` (Dr. GRPO). A group with fewer than two members or with std_g r == 0 has A = 0 and is
    flagged. Returns (A, zero-variance flag per group)."""
    advantages = torch.zeros_like(rewards)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    zero_variance = []
    for members in groups:
        r = rewards[members]
        std = r.std() if len(members) > 1 else r.new_tensor(0.0)  # a singleton has no baseline (TRL: A = 0)
        flat = len(members) < 2 or bool(torch.isclose(std, torch.zeros_like(std)))
        zero_variance.append(flat)
        if flat:
            continue
        centred = r - r.mean()
        if scale_rewards == "group":
            centred = centred / (std + ADV_EPS)
        elif scale_rewards == "batch":
            centred = centred / (batch_std + ADV_EPS)
        elif scale_rewards != "none":
            raise ValueError(f"grpo.scale_rewards: expected group, batch or none, got {scale_rewards!r}")
        advantages[members] = centred
    return advantages, torch.tensor(zero_variance, dtype=torch.bool)


def dropped_negatives(advantages: torch.Tensor, off_policy: torch.Tensor, rule: str) -> torch.Tensor:
    """drop_i = off_policy_i and A_i < 0 under `negative_advantage: drop` (w_i = 0: the response was never sampled
    from the training prompt, so pushing it down there is not justified); all False under `keep`."""
    if rule == "drop":
        return off_policy & (advantages < 0)
    if rule == "keep":
        return torch.zeros_like(off_policy)
    raise ValueError(f"lanpo.offpolicy.negative_advantage: expected drop or keep, got {rule!r}")


def needs_sampling_logps(correction: str) -> bool:
    """Whether `offpolicy_weight` reads the sequence log-ratio (and so the rollouts' sampling log-probs)."""
    return correction != "none"


def sequence_log_ratio(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_old(y|q_train) - log mu(y|q_sample) = sum_t (train_logps_t - sampling_logps_t) over the last axis,
    counting only tokens with mask_t and a finite sampling log-prob (a missing one contributes 0, as in TRL)."""
    valid = mask.bool() & torch.isfinite(sampling_logps)
    per_token = torch.where(valid, train_logps.float() - torch.where(valid, sampling_logps, 0.0), 0.0)
    return per_token.sum(-1)


def offpolicy_weight(correction: str, log_ratio: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """The detached per-sequence weight w of an off-policy response (trained under another prompt than it was
    sampled from), one branch per `lanpo.offpolicy.correction`:

    truncated_is  w = min(exp(log_ratio), max_ratio)   (exp(min(log_ratio, log max_ratio)): no overflow)
    none          w = 1"""
    if correction == "truncated_is":
        return torch.exp(torch.clamp(log_ratio, max=math.log(max_ratio)))
    if correction == "none":
        return torch.ones_like(log_ratio)
    raise ValueError(f"lanpo.offpolicy.correction: expected truncated_is or none, got {correction!r}")


def has_signal(advantages: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """w_i * A_i != 0 can hold (A_i != 0 and not dropped). Without a KL term a sequence without signal has exactly
    zero loss and gradient, so it need not be run (it still counts in TRL's normaliser)."""
    return (advantages != 0) & ~dropped
