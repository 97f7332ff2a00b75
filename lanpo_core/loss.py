"""The parts of the LANPO loss that TRL's GRPO loss cannot express, as pure tensor functions (METHOD.md step 8).

update.py hands TRL the weighted advantage A'_it = w_it * A_i of every completion token; TRL's clipped per-token
loss and its aggregation do the rest. The formulas and why they depart from textbook GRPO: docs/update.md. An off-policy
correction is one branch of `offpolicy_weight`, named like its `lanpo.offpolicy.correction` value; its weight
multiplies the advantage per token (a per-sequence weight is the same on every token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


CORRECTIONS = ("none", "sequence_truncated", "token_truncated", "geometric", "shaped")
"""The values of `lanpo.offpolicy.correction`, one branch each in `offpolicy_weight`."""


def needs_sampling_logps(correction: str) -> bool:
    """Whether `offpolicy_weight` reads the log-ratios (and so the rollouts' sampling log-probs)."""
    return correction != "none"


def token_log_ratio(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """delta_t = log pi_old(y_t|q_train, y_<t) - log mu(y_t|q_sample, y_<t) per completion token, 0 where mask_t
    is 0 or the sampling log-prob is missing (NaN: it contributes no correction, as in TRL)."""
    valid = mask.bool() & torch.isfinite(sampling_logps)
    return torch.where(valid, train_logps.float() - torch.where(valid, sampling_logps, 0.0), 0.0)


def sequence_log_ratio(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_old(y|q_train) - log mu(y|q_sample) = sum_t delta_t over the last axis (`token_log_ratio`)."""
    return token_log_ratio(train_logps, sampling_logps, mask).sum(-1)


@dataclass
class OffPolicyWeight:
    """What `offpolicy_weight` returns for B sequences of C completion tokens."""

    tokens: torch.Tensor
    """(B, C) the detached weight w_t that multiplies the advantage of token t (1 on padding)."""
    sequence: torch.Tensor
    """(B,) the token mean of w_t over the completion: the factor on the sequence's share of the loss."""
    truncated_frac: torch.Tensor
    """(B,) share of the completion's tokens whose weight was capped at max_ratio."""


def offpolicy_weight(correction: str, train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                     max_ratio: float, shaping_gamma: float) -> OffPolicyWeight:
    """The detached weight of an off-policy response y (sampled from mu(.|q_sample), trained as pi(y|q_train)), one
    branch per `lanpo.offpolicy.correction`; delta_t from `token_log_ratio`, L = the completion's token count,
    C = max_ratio, g = shaping_gamma (formulas and sources: docs/update.md, "Off-policy estimators"):

    none                w_t = 1
    sequence_truncated  w_t = min(exp(sum_t delta_t), C)           per sequence (truncated IS)
    geometric           w_t = min(exp(sum_t delta_t / L), C)       per sequence (GSPO's length-normalised ratio)
    token_truncated     w_t = min(exp(delta_t), C)                 per token (TRL's token_truncate)
    shaped              w_t = (1 + g) r_t / (r_t + g), r_t = exp(delta_t)   per token (LUFFY-style shaping)

    Every min(exp(x), C) is computed as exp(min(x, log C)), and r / (r + g) as sigmoid(delta - log g): no
    overflow."""
    mask = mask.bool()
    delta = token_log_ratio(train_logps, sampling_logps, mask)
    length = mask.sum(-1).clamp(min=1)
    log_cap = math.log(max_ratio)
    if correction == "none":
        log_w, capped = torch.zeros_like(delta), torch.zeros_like(mask)
    elif correction in ("sequence_truncated", "geometric"):
        seq = delta.sum(-1) if correction == "sequence_truncated" else delta.sum(-1) / length
        log_w, capped = seq[:, None].clamp(max=log_cap).expand_as(delta), (seq > log_cap)[:, None].expand_as(mask)
    elif correction == "token_truncated":
        log_w, capped = delta.clamp(max=log_cap), delta > log_cap
    elif correction == "shaped":
        if shaping_gamma <= 0:
            raise ValueError(f"lanpo.offpolicy.shaping_gamma: expected > 0, got {shaping_gamma}")
        weight = (1 + shaping_gamma) * torch.sigmoid(delta - math.log(shaping_gamma))
        log_w, capped = torch.log(weight), torch.zeros_like(mask)
    else:
        raise ValueError(f"lanpo.offpolicy.correction: expected one of {', '.join(CORRECTIONS)}, got {correction!r}")
    tokens = torch.where(mask, torch.exp(log_w), 1.0)
    sequence = torch.where(mask, tokens, 0.0).sum(-1) / length
    truncated = (capped & mask).sum(-1) / length
    return OffPolicyWeight(tokens, sequence, truncated.float())


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


def kind_diagnostics(kinds: Sequence[str], advantages: torch.Tensor, weights: torch.Tensor, dropped: torch.Tensor
                     ) -> dict[str, dict[str, float]]:
    """Per rollout kind, how much of the update it carries (docs/update.md, "Per-kind diagnostics"). `weights`
    (N,) is the final w of each sequence (0 for a dropped negative); S = the kind's trained sequences with signal
    (A != 0, not dropped), P = those of S with A > 0."""
    adv, w = advantages.double(), weights.double()
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        signal = [i for i in idx if adv[i] != 0 and not dropped[i]]
        positive = [i for i in signal if adv[i] > 0]
        out[kind] = {
            "weight_mean": float(w[signal].mean()) if signal else 1.0,
            "ess_frac": effective_sample_size_frac(w[signal]),
            "weight_mass": weight_mass(adv[idx], w[idx]),
            "adv_sum": float(adv[idx].sum()),
            "dropped_negatives": float(dropped[idx].sum()),
            "trained": float(len(signal)),
            "positive": float(len(positive)),
            "positive_mass": weight_mass(adv[positive], w[positive]),
        }
    return out
