"""Policy update: the pure LANPO loss terms (loss.py) and the completion log-prob kernel (logprobs.py) on hand-made
tensors; the LANPO loss/gradient against a reference written from METHOD.md step 8, equivalence with TRL's own GRPO on
an all-plain batch, checkpoints (atomic, keep-last-K, checksum) and exact resume.

Model tests run on the tiny random-weight Llama (`tiny_model_path`) in fp32."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from lanpo_core.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint, weights_checksum
from lanpo_core import logprobs
from lanpo_core.config import RunConfig
from lanpo_core.loss import (ADV_EPS, CORRECTIONS, baseline_advantages, dropped_negatives, effective_sample_size_frac,
                             group_advantages, group_members, has_signal, kind_diagnostics, needs_sampling_logps,
                             offpolicy_weight, plain_baseline_members, sequence_log_ratio, weight_mass)
from lanpo_core.update import PolicyUpdater, RolloutSample, build_grpo_args, training_prompt_ids

G = 4  # rollouts per problem in the hand-built batches


# ---------------------------------------------------------------------------------------------- helpers
def make_config(**sections) -> RunConfig:
    tree = {"grpo": {"bf16": False, "micro_batch_size": 3, "learning_rate": 1e-3, "steps": 3}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RunConfig.model_validate(tree)


_PRISTINE: dict[str, tuple] = {}


def load(path: str):
    """(fresh copy of the tiny model, tokenizer); the folder is read once per session."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path not in _PRISTINE:
        _PRISTINE[path] = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           AutoTokenizer.from_pretrained(path))
    model, tok = _PRISTINE[path]
    return copy.deepcopy(model), tok


def prompt_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    return list(tok(rendered, add_special_tokens=False).input_ids)


@torch.no_grad()
def token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion_t | prompt, completion_<t) by a plain, unpadded forward (the reference's own code)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, logits_to_keep=len(completion) + 1).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def build_batch(tok, ref_model, train_prompt: str, seed: int = 0, all_plain: bool = False):
    """3 problems x G rollouts: a mixed group, a zero-variance group and a mixed group; half context-conditioned.
    Sampling log-probs are the model's own plain-prompt log-probs shifted per sample, so the importance ratio is
    below, near and far above `max_ratio`; one token has no sampling log-prob."""
    rng = random.Random(seed)
    rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.5, 0.0]]
    shifts = [0.7, -1.5, 0.3, 0.4]  # per rollout: log-ratio = -shift, so context rollouts get w = 2 (truncated
    # from e^1.5) or e^-0.4
    samples = []
    for g in range(3):
        plain = prompt_ids(tok, f"What is {g + 2} + {g + 5}? Reason step by step.")
        context = prompt_ids(tok, f"An earlier attempt said {rng.randint(1, 20)}. Check it.\n"
                                  f"What is {g + 2} + {g + 5}? Reason step by step.")
        for j in range(G):
            ctx = (j % 2 == 1) and not all_plain
            kind = "plain" if not ctx else ("reflection" if g % 2 == 0 else "abstraction")
            completion = [rng.randrange(200, 20000) for _ in range(rng.randint(3, 9))]
            if j == 0 and g == 0:
                completion.append(tok.eos_token_id)
            lp = token_logps(ref_model, plain, completion)
            samp = (lp + shifts[j] / len(completion)).tolist()
            if g == 2 and j == 1:
                samp[1] = None
            samples.append(RolloutSample(
                group_id=f"p{g}", kind=kind,
                train_prompt_ids=training_prompt_ids(train_prompt, plain, context, ctx),
                completion_ids=completion, sampling_logprobs=samp, reward=rewards[g][j], context_conditioned=ctx))
    return samples


def reference_weights(correction: str, train: list[float], sampling: list[float | None], cap: float,
                      gamma: float) -> list[float]:
    """docs/update.md's estimator formulas, one token at a time in plain floats (a missing sampling log-prob gives
    delta_t = 0)."""
    delta = [0.0 if x is None or math.isnan(x) else t - x for t, x in zip(train, sampling)]
    if correction == "none":
        return [1.0] * len(delta)
    if correction == "sequence_truncated":
        return [min(math.exp(sum(delta)), cap)] * len(delta)
    if correction == "geometric":
        return [min(math.exp(sum(delta) / len(delta)), cap)] * len(delta)
    if correction == "token_truncated":
        return [min(math.exp(d), cap) for d in delta]
    if correction == "shaped":
        return [(1 + gamma) * math.exp(d) / (math.exp(d) + gamma) for d in delta]
    raise AssertionError(correction)


def reference_loss(model, ref_model, samples, cfg: RunConfig) -> torch.Tensor:
    """METHOD.md step 8, written out: group baseline over all kinds, the configured off-policy weight, negative drop,
    TRL-style clipped per-token loss and aggregation. Unpadded, one sequence at a time."""
    g, off = cfg.grpo, cfg.lanpo.offpolicy
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group_id, []).append(i)
    r = torch.tensor([s.reward for s in samples])
    adv = torch.zeros(len(samples))
    for idx in groups.values():
        rg = r[idx]
        std = rg.std()  # unbiased, as TRL
        if std == 0:
            continue
        a = rg - rg.mean()
        adv[idx] = a / (std + 1e-4) if g.scale_rewards == "group" else a
    per_seq, n_tokens = [], 0
    for i, s in enumerate(samples):
        ids = torch.tensor([s.train_prompt_ids + s.completion_ids])
        # logits at positions len(prompt)-1 ... end-1 predict the completion tokens
        logits = model(input_ids=ids, logits_to_keep=len(s.completion_ids) + 1).logits[0, :-1].float()
        lp = torch.log_softmax(logits / cfg.trainer_temperature(), -1)
        lp = lp.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        w = 1.0
        if s.context_conditioned and cfg.lanpo.train_prompt == "plain":
            if off.negative_advantage == "drop" and adv[i] < 0:
                w = 0.0
            else:
                w = torch.tensor(reference_weights(off.correction, lp.detach().tolist(), s.sampling_logprobs,
                                                   off.max_ratio, off.shaping_gamma))
        a = w * adv[i]
        ratio = torch.exp(lp - lp.detach())  # old = current policy under the training prompt (num_iterations=1)
        eps_hi = g.epsilon_high if g.epsilon_high is not None else g.epsilon
        tok_loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - g.epsilon, 1 + eps_hi) * a)
        if g.beta > 0:
            ref = token_logps(ref_model, s.train_prompt_ids, s.completion_ids)
            tok_loss = tok_loss + g.beta * (torch.exp(ref - lp) - (ref - lp) - 1)
        per_seq.append(tok_loss)
        n_tokens += len(s.completion_ids)
    n = len(samples)
    if g.loss_type == "dapo":
        return sum(t.sum() for t in per_seq) / n_tokens
    if g.loss_type == "grpo":
        return sum(t.mean() for t in per_seq) / n
    if g.loss_type == "dr_grpo":
        return sum(t.sum() for t in per_seq) / (n * cfg.rollout.max_new_tokens)
    raise AssertionError(g.loss_type)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ours: dict, ref: dict, tol: float = 1e-5):
    # the updater's model is the same architecture; names match up to a peft/base prefix
    assert ours.keys() == ref.keys()
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(r.abs().max().item() for r in ref.values())
    assert scale > 1e-4, "reference gradient is ~0: the test batch carries no signal"
    assert worst <= tol, f"max |grad diff| {worst:.3g} > {tol} (max |grad| {scale:.3g})"


# ---------------------------------------------------------------------------------------------- loss.py
def test_group_advantages_mix_kinds_in_one_group():
    # one group of four rollouts of one problem (kinds do not matter), then a second group
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    groups = group_members(["a", "a", "b", "a", "a", "b"])
    assert groups == [[0, 1, 3, 4], [2, 5]]
    adv, zero_var = group_advantages(rewards, groups, "group")
    std_a = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()  # Bessel: sqrt(1/3)
    expected_a = (torch.tensor([1.0, 0.0, 1.0, 0.0]) - 0.5) / (std_a + ADV_EPS)
    assert torch.allclose(adv[[0, 1, 3, 4]], expected_a)
    assert torch.allclose(adv[[2, 5]], torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + ADV_EPS))
    assert zero_var.tolist() == [False, False]


def test_group_advantages_singleton_and_zero_variance_groups_are_zero():
    rewards = torch.tensor([1.0, 0.7, 0.7, 0.7, 0.0, 1.0])
    groups = group_members(["solo", "flat", "flat", "flat", "mixed", "mixed"])
    adv, zero_var = group_advantages(rewards, groups, "group")
    assert zero_var.tolist() == [True, True, False]
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[4] < 0 < adv[5]


@pytest.mark.parametrize("scale", ["batch", "none"])
def test_group_advantages_batch_and_no_scaling(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 1.0])
    groups = [[0, 1, 2], [3, 4, 5]]
    adv, _ = group_advantages(rewards, groups, scale)
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, -0.5, 0.0, 0.5])
    denom = rewards.std() + ADV_EPS if scale == "batch" else 1.0
    assert torch.allclose(adv, centred / denom)


def test_group_advantages_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.tensor([0.0, 1.0]), [[0, 1]], "global")


def test_negatives_are_dropped_only_for_off_policy_rollouts():
    adv = torch.tensor([-1.0, -1.0, 0.5, 0.0])
    off_policy = torch.tensor([True, False, True, True])
    assert dropped_negatives(adv, off_policy, "drop").tolist() == [True, False, False, False]
    assert dropped_negatives(adv, off_policy, "keep").tolist() == [False, False, False, False]
    dropped = dropped_negatives(adv, off_policy, "drop")
    assert has_signal(adv, dropped).tolist() == [False, True, True, False]


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_offpolicy_weight_matches_formula(correction):
    # three sequences: ratios below, near and far above the cap, one missing sampling log-prob, padding
    gen = torch.Generator().manual_seed(3)
    train = -torch.rand(3, 6, generator=gen, dtype=torch.float64) * 3
    sampling = train - torch.tensor([[0.9, -0.4, 0.2, 1.5, 0.0, 0.3], [0.05] * 6, [-3.0, -2.5, 0.1, -1.0, -4.0, 2.0]],
                                    dtype=torch.float64)
    sampling[1, 2] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    cap, gamma = 2.0, 0.1
    out = offpolicy_weight(correction, train, sampling, mask, cap, gamma)
    for b in range(3):
        n = int(mask[b].sum())
        ref = reference_weights(correction, train[b, :n].tolist(),
                                [None if math.isnan(x) else x for x in sampling[b, :n].tolist()], cap, gamma)
        assert out.tokens[b, :n].tolist() == pytest.approx(ref, abs=1e-5), (correction, b)
        assert out.tokens[b, n:].tolist() == [1.0] * (6 - n)  # padding is never weighted
        assert float(out.sequence[b]) == pytest.approx(sum(ref) / n, abs=1e-5)
        capped = [w >= cap - 1e-12 for w in ref]  # `shaped` stays below 1 + gamma < cap, `none` at 1
        assert float(out.truncated_frac[b]) == pytest.approx(sum(capped) / n)
    assert needs_sampling_logps(correction) == (correction != "none")


def test_offpolicy_weight_never_overflows_and_rejects_unknown():
    train = torch.zeros(1, 3)
    sampling = torch.tensor([[-1e4, 0.0, 1e4]])  # delta = 1e4, 0, -1e4
    mask = torch.ones(1, 3)
    for correction in CORRECTIONS:
        out = offpolicy_weight(correction, train, sampling, mask, 2.0, 0.1)
        assert torch.isfinite(out.tokens).all(), correction
    assert offpolicy_weight("token_truncated", train, sampling, mask, 2.0, 0.1).tokens.tolist() == [[2.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="correction"):
        offpolicy_weight("per_token", train, sampling, mask, 2.0, 0.1)


def test_old_correction_name_is_refused_with_the_new_one():
    with pytest.raises(ValueError, match="renamed `sequence_truncated`"):
        make_config(lanpo={"offpolicy": {"correction": "truncated_is"}})


def test_sequence_log_ratio_counts_missing_sampling_logprob_as_zero():
    train = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-0.5, -0.5, 0.0, 0.0]])
    sampling = torch.tensor([[-1.5, float("nan"), -2.0, -1.0], [-1.0, -0.25, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # the last token of row 0 is padding
    log_ratio = sequence_log_ratio(train, sampling, mask)
    # row 0: (-1 + 1.5) + 0 (no sampling log-prob) + (-3 + 2); row 1: (-0.5 + 1) + (-0.5 + 0.25)
    assert torch.allclose(log_ratio, torch.tensor([-0.5, 0.25]))


def test_kind_diagnostics_by_formula():
    kinds = ["plain", "plain", "reflection", "reflection", "reflection", "abstraction"]
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.0, 1.5])
    w = torch.tensor([1.0, 1.0, 0.25, 0.0, 0.7, 1.0])
    dropped = torch.tensor([False, False, False, True, False, False])
    d = kind_diagnostics(kinds, adv, w, dropped)
    assert d["plain"] == {"weight_mean": 1.0, "ess_frac": 1.0, "weight_mass": 2.0, "adv_sum": 0.0,
                          "dropped_negatives": 0.0, "trained": 2.0, "positive": 1.0, "positive_mass": 1.0}
    # reflection: one trained positive (w 0.25), one dropped negative, one without signal (A = 0)
    assert d["reflection"] == {"weight_mean": 0.25, "ess_frac": 1.0, "weight_mass": 0.5, "adv_sum": 1.5,
                               "dropped_negatives": 1.0, "trained": 1.0, "positive": 1.0, "positive_mass": 0.5}
    assert d["abstraction"]["positive_mass"] == 1.5


def test_plain_only_baseline_uses_plain_rollouts_and_falls_back():
    # four groups: plain rollouts marked P, context ones C
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0,   # P P C C: plain mean 0.5, std sqrt(0.5)
                            1.0, 0.0, 0.0,        # P C C: one plain -> whole group
                            0.0, 0.0, 1.0,        # P P C: plain std 0 -> whole group under `group` scaling
                            1.0, 1.0])            # P C: all equal -> zero variance, not a fallback
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    is_plain = [True, True, False, False, True, False, False, True, True, False, True, False]
    baselines = plain_baseline_members(groups, is_plain)
    assert baselines == [[0, 1], [4], [7, 8], [10]]
    adv, zero_var, fallback = baseline_advantages(rewards, groups, baselines, "group")
    a, b, c = 0.7070067953, 1.1545005730, 0.5772502865  # 0.5/(sqrt .5+eps), (2/3)/(sqrt(1/3)+eps), (1/3)/(...)
    expected = [a, -a, a, a, b, -c, -c, -c, -c, b, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6, rtol=0)
    assert zero_var.tolist() == [False, False, False, True]
    assert fallback.tolist() == [False, True, True, False]
    # without scaling a flat plain baseline is usable: A = r - mean_plain
    adv, _, fallback = baseline_advantages(rewards, groups, baselines, "none")
    assert torch.allclose(adv[7:10], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, 0.5, 0.5]), atol=1e-6, rtol=0)
    assert fallback.tolist() == [False, True, False, False]
    # b = g is exactly group_advantages
    full, full_zero_var = group_advantages(rewards, groups, "group")
    same, same_zero_var, none_fell_back = baseline_advantages(rewards, groups, groups, "group")
    assert torch.equal(full, same) and torch.equal(full_zero_var, same_zero_var) and not none_fell_back.any()
    with pytest.raises(ValueError, match="baseline_members"):
        baseline_advantages(rewards, groups, [[0, 4], [4], [7], [10]], "group")


def test_effective_sample_size_and_weight_mass():
    # (1 + 1 + 0.5 + 0)^2 / (4 * (1 + 1 + 0.25 + 0)) = 6.25 / 9
    assert effective_sample_size_frac(torch.tensor([1.0, 1.0, 0.5, 0.0])) == pytest.approx(6.25 / 9, abs=1e-9)
    assert effective_sample_size_frac(torch.tensor([0.3, 0.3, 0.3])) == pytest.approx(1.0, abs=1e-9)
    assert effective_sample_size_frac(torch.tensor([2.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25, abs=1e-9)
    assert effective_sample_size_frac(torch.tensor([])) == 1.0
    assert effective_sample_size_frac(torch.tensor([0.0, 0.0])) == 0.0
    # |1.5 * 0.5| + |-0.5 * 0| + |-1 * 2|
    assert weight_mass(torch.tensor([1.5, -0.5, -1.0]), torch.tensor([0.5, 0.0, 2.0])) == pytest.approx(2.75)


def test_lanpo_baseline_and_context_fields_validate():
    cfg = RunConfig.model_validate({})
    assert (cfg.lanpo.baseline, cfg.lanpo.context_in_update, cfg.lanpo.offpolicy.min_context_mass_frac) == \
        ("group", True, 0.1)
    with pytest.raises(Exception, match="baseline"):
        RunConfig.model_validate({"lanpo": {"baseline": "context_only"}})
    with pytest.raises(Exception, match="min_context_mass_frac"):
        RunConfig.model_validate({"lanpo": {"offpolicy": {"min_context_mass_frac": -1}}})


# ---------------------------------------------------------------------------------------------- logprobs.py
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_completion_logprobs_kernel_matches_log_softmax(monkeypatch, temperature, bias):
    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 4)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 8, generator=gen).requires_grad_()
    b = torch.randn(50, generator=gen).requires_grad_() if bias else None
    targets = torch.randint(0, 50, (10,), generator=gen)
    upstream = torch.randn(10, generator=gen)

    logps, entropy = logprobs.CompletionLogProbs.apply(hidden, weight, b, targets, temperature, torch.float32, True)
    (logps * upstream).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    z = (hidden @ weight.t() + (b if bias else 0.0)) / temperature
    ref = torch.log_softmax(z, -1)
    ref_logps = ref.gather(1, targets[:, None])[:, 0]
    (ref_logps * upstream).sum().backward()
    refs = [t.grad for t in (hidden, weight, b) if t is not None]
    assert torch.allclose(logps, ref_logps.detach(), atol=1e-5)
    assert torch.allclose(entropy, -(ref.exp() * ref).sum(-1).detach(), atol=1e-5)
    for got, want in zip(ours, refs):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_completion_logps_repacks_padding_and_scores_completions_only(tiny_model_path):
    model, tok = load(tiny_model_path)
    model.eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    completions = [[11, 12], [13, 14, 15]]
    # TRL's layout: prompts left-padded, completions right-padded
    ids = torch.tensor([[5, 6, 7, 8, 11, 12, 0], [0, 0, 9, 10, 13, 14, 15]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    logps, entropy = logprobs.completion_logps(model, ids, mask, 3, compute_entropy=True)
    assert logps.shape == (2, 3)
    assert entropy.shape == (2, 3)
    assert logps[0, 2] == 0
    assert entropy[0, 2] == 0
    for row, (p, c) in enumerate(zip(prompts, completions)):
        want = token_logps(model, p, c)
        assert torch.allclose(logps[row, : len(c)], want, atol=1e-5), (row, logps[row], want)


# ---------------------------------------------------------------------------------------------- numeric tests
@pytest.mark.parametrize("train_prompt", ["plain", "context"])
def test_lanpo_loss_and_gradient_match_reference(tiny_model_path, tmp_path, train_prompt):
    """Every combination of train_prompt x offpolicy.correction x offpolicy.negative_advantage. The off-policy
    settings are only read when a step's batch is prepared, so one updater serves the four combinations of a
    training prompt (gradients only: the weights never change here)."""
    cfg = make_config(lanpo={"train_prompt": train_prompt})
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, train_prompt)
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    assert up.trainer._lanpo_causal_lm(up.model) is not None  # logprobs.py scores, not TRL's fallback kernel
    off_policy = train_prompt == "plain"
    for correction in CORRECTIONS:
        for negative in ("drop", "keep"):
            combo = f"{train_prompt}/{correction}/{negative}"
            cfg.lanpo.offpolicy.correction = correction
            cfg.lanpo.offpolicy.negative_advantage = negative
            metrics = up.compute_gradients(samples)
            ref_model.zero_grad()
            ref = reference_loss(ref_model, None, samples, cfg)
            ref.backward()
            assert abs(metrics["loss"] - ref.item()) <= 1e-5, (combo, metrics["loss"], ref.item())
            assert_grads_close(grads_of(up.model), grads_of(ref_model))

            assert metrics["zero_variance_groups"] == 1, combo
            assert metrics["count/off_policy"] == (6 if off_policy else 0), combo
            # context rollouts with A < 0 are p0/j1 and p2/j3
            drops = 2 if (off_policy and negative == "drop") else 0
            assert metrics["dropped_negatives"] == drops, combo
            if off_policy and correction != "none":
                assert metrics["is/n"] == 2 + (2 - drops), combo  # trained off-policy sequences
                if correction == "sequence_truncated":
                    assert 0 < metrics["is/truncated_frac"] < 1, combo
                assert metrics["is/ratio_max"] > cfg.lanpo.offpolicy.max_ratio, combo
                assert metrics["is/nan_tokens"] == 1, combo
            else:
                assert metrics["is/n"] == 0, combo
            # the zero-variance group and dropped rollouts are not run (beta = 0) but stay in the normaliser
            assert metrics["samples/trained"] == 12 - G - drops, combo


@pytest.mark.parametrize("loss_type,scale,beta", [("grpo", "group", 0.0), ("dr_grpo", "none", 0.0),
                                                  ("dapo", "group", 0.05)])
def test_loss_types_and_kl_match_reference(tiny_model_path, tmp_path, loss_type, scale, beta):
    cfg = make_config(grpo={"loss_type": loss_type, "scale_rewards": scale, "beta": beta},
                      rollout={"max_new_tokens": 16})
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain")
    model, _ = load(tiny_model_path)
    frozen, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run", ref_model=frozen if beta else None)
    metrics = up.compute_gradients(samples)
    ref_model.zero_grad()
    ref = reference_loss(ref_model, frozen, samples, cfg)
    ref.backward()
    assert abs(metrics["loss"] - ref.item()) <= 1e-5
    assert_grads_close(grads_of(up.model), grads_of(ref_model))
    if beta:
        assert metrics["samples/trained"] == 12  # with a KL term every sequence is run
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update


# ---------------------------------------------------------------------------------------------- TRL equivalence
def _vanilla_trl_step(cfg: RunConfig, model_path: str, samples, out_dir: Path, num_iterations: int):
    """TRL's own GRPOTrainer.train() on the same rollouts, fed through its `rollout_func` hook; returns (grads of
    the first optimiser step, final parameters)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    model, tok = load(model_path)
    by_group: dict[str, list[RolloutSample]] = {}
    for s in samples:
        by_group.setdefault(s.group_id, []).append(s)
    texts = {f"prompt-{gid}": gid for gid in by_group}
    handed: dict[str, int] = {}
    reward_of = {tuple(s.completion_ids): s.reward for s in samples}

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for p in prompts:
            gid = texts[p]
            k = handed.get(gid, 0) % len(by_group[gid])
            handed[gid] = k + 1
            s = by_group[gid][k]
            out["prompt_ids"].append(s.train_prompt_ids)
            out["completion_ids"].append(s.completion_ids)
            out["logprobs"].append([0.0] * len(s.completion_ids))
        return out

    def reward(completions, completion_ids, **kwargs):
        return [reward_of[tuple(c)] for c in completion_ids]

    captured = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if not captured:
                captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None})

    n = len(samples)
    mbs = cfg.grpo.micro_batch_size
    args = build_grpo_args(cfg, out_dir, per_device_train_batch_size=mbs, gradient_accumulation_steps=n // mbs,
                           steps_per_generation=n // mbs, num_generations=G, max_steps=num_iterations,
                           num_iterations=num_iterations)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": list(texts)}), rollout_func=rollout_func,
                          callbacks=[Grab()])
    trainer.train()
    return captured, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss_type,num_iterations", [("dapo", 1), ("grpo", 2)])
def test_all_plain_batch_equals_trl_grpo(tiny_model_path, tmp_path, loss_type, num_iterations, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = make_config(grpo={"micro_batch_size": 4, "max_grad_norm": 1e6, "learning_rate": 5e-3,
                            "loss_type": loss_type, "num_iterations": num_iterations, "steps": 1},
                      lanpo={"rollout_mix": {"plain": 1.0, "reflection": 0.0, "abstraction": 0.0}})
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain", seed=3, all_plain=True)
    trl_grads, trl_params = _vanilla_trl_step(cfg, tiny_model_path, samples, tmp_path / "trl", num_iterations)

    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    assert up.trainer._lanpo_causal_lm(up.model) is not None  # logprobs.py scores, TRL's own kernel the reference
    up.compute_gradients(samples)  # the first pass: same gradient as TRL's first optimiser step
    assert_grads_close(grads_of(up.model), trl_grads)
    model2, _ = load(tiny_model_path)
    up2 = PolicyUpdater(cfg, model2, tok, tmp_path / "run2")
    metrics = up2.step(samples)
    assert metrics["count/off_policy"] == 0
    assert metrics["is/n"] == 0
    ours = dict(up2.model.named_parameters())
    worst = max((ours[k].detach() - trl_params[k]).abs().max().item() for k in trl_params)
    moved = max((ours[k].detach() - v).abs().max().item() for k, v in ref_model.named_parameters())
    assert moved > 1e-3  # the update did something
    step_ours = torch.cat([(ours[k].detach() - v).flatten() for k, v in ref_model.named_parameters()])
    step_trl = torch.cat([(trl_params[k] - v).flatten() for k, v in ref_model.named_parameters()])
    rel = ((step_ours - step_trl).norm() / step_trl.norm()).item()
    assert rel <= 1e-4, f"update differs from TRL's by {rel:.3g} (relative)"
    # Adam's first steps are lr * g / (|g| + 1e-8): a parameter whose gradient is ~1e-8 turns a 1e-12 float
    # difference into a visible one, so the element-wise bound is relative to the learning rate
    assert worst <= 1e-2 * cfg.grpo.learning_rate, f"weights differ from TRL's by {worst:.3g}"
    if num_iterations > 1:
        assert metrics["clip_frac/region"] == 0.0  # first pass: ratio == 1
        assert metrics["grad_norm_max"] > 0


# ---------------------------------------------------------------------------------------------- checkpoints
def step_samples(tok, ref_model, step: int):
    samples = build_batch(tok, ref_model, "plain", seed=10 + step)
    rng = random.Random(step)
    for s in samples:  # different rewards every step
        if s.group_id != "p1":
            s.reward = float(rng.random() < 0.5)
    return samples


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_exact(tiny_model_path, tmp_path, lora):
    cfg = make_config(grpo={"learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_steps": 1, "steps": 3,
                            "checkpoint_keep_last": 2},
                      model={"lora": {"enabled": lora, "r": 4, "alpha": 8}})
    ref_model, tok = load(tiny_model_path)
    batches = [step_samples(tok, ref_model, k) for k in range(3)]

    model, _ = load(tiny_model_path)
    straight = PolicyUpdater(cfg, model, tok, tmp_path / "straight")
    for b in batches:
        straight.step(b)

    model, _ = load(tiny_model_path)
    first = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    first.step(batches[0])
    first.save_checkpoint()
    first.step(batches[1])
    info = first.save_checkpoint()
    saved_rng = torch.get_rng_state()
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    del first

    model, _ = load(tiny_model_path)
    resumed = PolicyUpdater.resume(cfg, model, tok, tmp_path / "run", require=True)
    assert resumed.step_count == 2
    assert resumed.last_checkpoint.checksum == info.checksum
    assert torch.equal(torch.get_rng_state(), saved_rng)
    m = resumed.step(batches[2])
    assert m["step"] == 3
    a = dict(straight.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    worst = max((a[k].detach() - b[k].detach()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst:.3g}"
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    assert resumed.optimizer_steps == 3
    # a checkpoint of equal weights has an equal checksum (cache key)
    assert resumed.save_checkpoint().checksum == straight.save_checkpoint().checksum
    if lora:
        assert (info.path / "adapter_model.safetensors").is_file()
        assert not (info.path / "model.safetensors").exists()


def test_checkpoint_layout_keep_last_and_checksum(tiny_model_path, tmp_path):
    cfg = make_config(grpo={"checkpoint_keep_last": 2})
    ref_model, tok = load(tiny_model_path)
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    infos = []
    for k in range(3):
        up.step(step_samples(tok, ref_model, k))
        infos.append(up.save_checkpoint())
    kept = list_checkpoints(tmp_path / "run")
    assert [c.step for c in kept] == [2, 3]
    assert not infos[0].path.exists()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]  # no temporary folders left
    last = latest_checkpoint(tmp_path / "run")
    assert last.path.name == "step-000003"
    assert last.checksum == infos[2].checksum
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
            "tokenizer.json"} <= {p.name for p in last.path.iterdir()}
    assert weights_checksum(last.path)[0] == last.checksum
    assert len({i.checksum for i in infos}) == 3  # weights changed every step
    verify_checkpoint(last.path)
    with open(last.path / "model.safetensors", "r+b") as f:  # corrupt one byte of the weights
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="checksum"):
        verify_checkpoint(last.path)
    # the saved folder is a loadable model
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(kept[0].path)
    assert reloaded.config.vocab_size == model.config.vocab_size


def test_zero_variance_only_batch_skips_update(tiny_model_path, tmp_path):
    cfg = make_config()
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain")
    for s in samples:
        s.reward = 1.0 if s.group_id == "p0" else 0.0
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in up.model.named_parameters()}
    m = up.step(samples)
    assert m["update_skipped"] == 1
    assert m["zero_variance_groups"] == 3
    assert m["samples/trained"] == 0
    assert m["loss"] == 0
    assert up.step_count == 1
    assert all(torch.equal(before[k], v) for k, v in up.model.named_parameters())


def test_a_step_without_usable_rollouts_skips_the_update(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    up = PolicyUpdater(make_config(), model, tok, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in up.model.named_parameters()}
    m = up.step([])
    assert m["update_skipped"] == 1
    assert m["samples/total"] == 0
    assert m["loss"] == 0
    assert up.step_count == 1
    assert all(torch.equal(before[k], v) for k, v in up.model.named_parameters())
    assert up.save_checkpoint().step == 1  # and the run goes on


def test_bf16_autocast_step_runs(tiny_model_path, tmp_path):
    cfg = make_config(grpo={"bf16": True})
    ref_model, tok = load(tiny_model_path)
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    m = up.step(build_batch(tok, ref_model, "plain"))
    assert math.isfinite(m["loss"])
    assert m["grad_norm"] > 0
    assert next(up.model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_bad_input_is_rejected(tiny_model_path, tmp_path):
    cfg = make_config()
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain")
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    samples[3].sampling_logprobs = None  # a context-conditioned rollout with positive advantage
    with pytest.raises(ValueError, match="sampling log-prob"):
        up.step(samples)


def test_per_kind_metrics_and_baseline_controls(tiny_model_path, tmp_path, caplog):
    """build_batch: reflection rollouts in p0 and p2 (one positive each with w = e^-0.4 and w = 2 (truncated), one
    dropped negative each), abstraction only in the zero-variance group p1. Per-sequence weights, so the figures can
    be written by hand."""
    cfg = make_config(lanpo={"offpolicy": {"correction": "sequence_truncated"}})
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain")
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    rewards = torch.tensor([s.reward for s in samples])
    adv, _ = group_advantages(rewards, group_members([s.group_id for s in samples]), "group")
    kinds = [s.kind for s in samples]
    by_kind = {k: [i for i, x in enumerate(kinds) if x == k] for k in ("plain", "reflection", "abstraction")}

    cfg.lanpo.offpolicy.min_context_mass_frac = 0.0
    with caplog.at_level("WARNING", logger="lanpo_core.update"):
        m = up.compute_gradients(samples)
    assert not [r for r in caplog.records if "min_context_mass_frac" in r.getMessage()]
    plain = by_kind["plain"]
    assert m["kind/plain/weight_mean"] == 1.0 and m["kind/plain/ess_frac"] == pytest.approx(1.0)
    assert m["kind/plain/weight_mass"] == pytest.approx(float(adv[plain].abs().sum()), abs=1e-5)
    assert m["kind/plain/adv_sum"] == pytest.approx(float(adv[plain].sum()), abs=1e-5)
    assert (m["kind/plain/truncated_frac"], m["kind/plain/dropped_negatives"]) == (0.0, 0.0)
    w_low, w_high = math.exp(-0.4), 2.0  # p0/j3 and p2/j1; p0/j1 and p2/j3 dropped (w = 0)
    # weight mean and ESS are over the trained sequences: the two positives (the dropped ones are counted apart)
    assert m["kind/reflection/weight_mean"] == pytest.approx((w_low + w_high) / 2, abs=1e-4)
    assert m["kind/reflection/ess_frac"] == pytest.approx((w_low + w_high) ** 2 / (2 * (w_low ** 2 + w_high ** 2)),
                                                          abs=1e-4)
    assert (m["kind/reflection/trained"], m["kind/reflection/positive"]) == (2.0, 2.0)
    assert m["kind/reflection/positive_mass"] == pytest.approx(m["kind/reflection/weight_mass"], abs=1e-6)
    assert m["kind/reflection/weight_mass"] == pytest.approx(w_low * abs(float(adv[3])) + w_high * float(adv[9]),
                                                             abs=1e-4)
    assert m["kind/reflection/adv_sum"] == pytest.approx(float(adv[by_kind["reflection"]].sum()), abs=1e-5)
    assert m["kind/reflection/truncated_frac"] == 0.5
    assert m["kind/reflection/dropped_negatives"] == 2
    # abstraction sits in the zero-variance group only: no signal, no weight to measure
    assert (m["kind/abstraction/weight_mass"], m["kind/abstraction/adv_sum"]) == (0.0, 0.0)
    assert (m["kind/abstraction/weight_mean"], m["kind/abstraction/ess_frac"]) == (1.0, 1.0)
    assert m["baseline_fallback_groups"] == 0 and m["samples/context_left_out"] == 0

    cfg.lanpo.offpolicy.min_context_mass_frac = 10.0
    caplog.clear()
    with caplog.at_level("WARNING", logger="lanpo_core.update"):
        up.compute_gradients(samples)
    warned = [r.getMessage() for r in caplog.records if "min_context_mass_frac" in r.getMessage()]
    assert len(warned) == 1 and "abstraction+reflection" in warned[0]
    cfg.lanpo.offpolicy.min_context_mass_frac = 0.1

    # plain_only: p0's and p2's advantages come from their two plain rollouts; with p2's plain rewards made equal
    # (0, 0) p2 falls back to its whole group
    cfg.lanpo.baseline = "plain_only"
    m = up.compute_gradients(samples)
    assert m["baseline_fallback_groups"] == 0
    plain_p0 = (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (math.sqrt(0.5) + ADV_EPS)
    assert m["kind/plain/adv_sum"] == pytest.approx(float(plain_p0[[0, 2]].sum() + (-0.25 + 0.25)
                                                          / (math.sqrt(0.125) + ADV_EPS)), abs=1e-5)
    p2_scale = math.sqrt(0.125) + ADV_EPS  # plain rewards 0, 0.5
    assert m["kind/reflection/adv_sum"] == pytest.approx(float(plain_p0[[1, 3]].sum()) + (0.75 - 0.25) / p2_scale,
                                                         abs=1e-5)
    samples[10].reward = 0.0
    assert up.compute_gradients(samples)["baseline_fallback_groups"] == 1
    samples[10].reward = 0.5
    cfg.lanpo.baseline = "group"

    # context_in_update: false trains exactly the plain subset
    cfg.lanpo.context_in_update = False
    left_out = up.compute_gradients(samples)
    grads_left_out = grads_of(up.model)
    assert left_out["samples/context_left_out"] == 6 and left_out["samples/total"] == 6
    assert left_out["count/reflection"] == 4  # still scored and reported
    assert not any(k.startswith(("kind/reflection", "kind/abstraction")) for k in left_out)
    cfg.lanpo.context_in_update = True
    only_plain = up.compute_gradients([s for s in samples if not s.context_conditioned])
    assert left_out["loss"] == only_plain["loss"]
    ref = grads_of(up.model)
    assert grads_left_out.keys() == ref.keys()
    assert all(torch.equal(grads_left_out[k], ref[k]) for k in ref)
    mixed = up.compute_gradients(samples)  # the context rollouts do change the update when they are in it
    assert mixed["loss"] != only_plain["loss"]


def test_offpolicy_diagnostics_agree_with_the_update(tiny_model_path, tmp_path):
    """The no-training report of every estimator gives, for the configured one, the per-kind figures the update
    itself logs (same weights, same advantages)."""
    cfg = make_config()
    ref_model, tok = load(tiny_model_path)
    samples = build_batch(tok, ref_model, "plain")
    model, _ = load(tiny_model_path)
    up = PolicyUpdater(cfg, model, tok, tmp_path / "run")
    report, log_ratios = up.offpolicy_diagnostics(samples)
    assert sorted(report) == sorted(CORRECTIONS)
    # plain rollouts: sampling log-probs are the model's own plus shift / length, so the log-ratios are -0.7 (three)
    # and -0.3 (three); torch's median is the lower middle value
    assert log_ratios["plain"]["sequence_median"] == pytest.approx(-0.7, abs=1e-4)
    for correction in ("sequence_truncated", "token_truncated", "shaped"):
        cfg.lanpo.offpolicy.correction = correction
        m = up.compute_gradients(samples)
        for kind in ("plain", "reflection", "abstraction"):
            for name in ("weight_mean", "ess_frac", "weight_mass", "positive_mass", "truncated_frac"):
                assert report[correction][kind][name] == pytest.approx(m[f"kind/{kind}/{name}"], abs=1e-5), \
                    (correction, kind, name)
    assert report["none"]["reflection"]["weight_mean_all"] == 1.0
    # reflection (p0 and p2, rollouts 1 and 3): sequence log-ratios 1.5 and -0.4 twice (minus build_batch's shifts;
    # the missing sampling log-prob leaves p2's first above log 2)
    expected = [min(math.exp(x), 2.0) for x in (1.5, -0.4, 1.5, -0.4)]
    assert report["sequence_truncated"]["reflection"]["weight_mean_all"] == pytest.approx(sum(expected) / 4, abs=1e-4)
