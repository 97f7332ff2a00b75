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
    advantages, zero_variance, _ = baseline_advantages(rewards, groups, groups, scale_rewards)
    return advantages, zero_variance


def plain_baseline_members(groups: list[list[int]], is_plain: Sequence[bool]) -> list[list[int]]:
    """Per group, the members whose rewards form the baseline under `lanpo.baseline: plain_only`: its plain
    rollouts (`baseline_advantages` falls back to the whole group where they cannot carry a baseline)."""
    return [[i for i in members if is_plain[i]] for members in groups]


def baseline_advantages(rewards: torch.Tensor, groups: list[list[int]], baseline_members: list[list[int]],
                        scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean_b r) / (s + eps) for every member i of group g, the baseline b = `baseline_members[g]`
    (a subset of g; b = g is `group_advantages`).

    s = std_b r (Bessel-corrected) for `scale_rewards: group`, std r over the batch for `batch`, none for `none`.
    A group whose own rewards are all equal (or a singleton) has A = 0 and is flagged zero-variance, whatever b. b
    falls back to the whole group g, flagged, when it has fewer than two members, or when std_b r == 0 under
    `group` (dividing by eps alone would blow the advantages up by 1e4). Returns (A, zero-variance flag per group,
    fallback flag per group)."""
    if len(baseline_members) != len(groups):
        raise ValueError(f"baseline_members: expected one list per group ({len(groups)}), got {len(baseline_members)}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"grpo.scale_rewards: expected group, batch or none, got {scale_rewards!r}")
    advantages = torch.zeros_like(rewards)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    zero_variance, fallback = [], []
    for members, base in zip(groups, baseline_members):
        if not set(base) <= set(members):
            raise ValueError(f"baseline_members: {base} is not a subset of its group {members}")
        r = rewards[members]
        std = r.std() if len(members) > 1 else r.new_tensor(0.0)  # a singleton has no baseline (TRL: A = 0)
        flat = len(members) < 2 or bool(torch.isclose(std, torch.zeros_like(std)))
        zero_variance.append(flat)
        fell_back = False
        if len(base) != len(members):
            rb = rewards[base]
            base_std = rb.std() if len(base) > 1 else rb.new_tensor(0.0)
            flat_base = bool(torch.isclose(base_std, torch.zeros_like(base_std)))
            unusable = len(base) < 2 or (scale_rewards == "group" and flat_base)
            fell_back = not flat and unusable
            if not unusable:
                mean, std = rb.mean(), base_std
            else:
                mean = r.mean()
        else:
            mean = r.mean()
        fallback.append(fell_back)
        if flat:
            continue
        centred = r - mean
        if scale_rewards == "group":
            centred = centred / (std + ADV_EPS)
        elif scale_rewards == "batch":
            centred = centred / (batch_std + ADV_EPS)
        advantages[members] = centred
    return advantages, torch.tensor(zero_variance, dtype=torch.bool), torch.tensor(fallback, dtype=torch.bool)


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



def effective_sample_size_frac(weights: torch.Tensor) -> float:
    """ESS / n = (sum_i w_i)^2 / (n * sum_i w_i^2) over n sequences: 1 when all weights are equal, 1/n when one
    sequence carries all the weight. 1.0 for n == 0 (nothing to measure); 0.0 when every w_i == 0 (no sequence
    carries weight, e.g. all dropped negatives)."""
    n = weights.numel()
    if n == 0:
        return 1.0
    w = weights.double()
    squares = float((w * w).sum())
    if squares == 0.0:
        return 0.0
    return float(w.sum()) ** 2 / (n * squares)


def weight_mass(advantages: torch.Tensor, weights: torch.Tensor) -> float:
    """sum_i |A_i * w_i|: how much the sequences move the loss (the advantages TRL receives, in absolute value)."""
    return float((advantages.double() * weights.double()).abs().sum())
