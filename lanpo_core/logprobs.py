"""Per-token log-probs of completions for the update: the backbone once, the LM head only where a token is scored.

TRL's fused LM head scores every position of the padded batch on devices without Triton (prompt and padding
included) and computes its softmax gradient in a dozen full-vocabulary passes. Here the sequences are repacked
without interior padding, the LM head runs on the completion positions only, and its backward recomputes the logits
one token chunk at a time and turns them into the gradient in place. See docs/update.md ("Speed").
"""

from __future__ import annotations

import torch

# Tokens per LM-head chunk: bounds the (chunk, vocab) fp32 buffer (512 x 49k x 4 B = 100 MB for SmolLM2).
CHUNK_TOKENS = 512


class CompletionLogProbs(torch.autograd.Function):
    """log p(target_n | hidden_n) = z_n[target_n] - logsumexp(z_n), z_n = (hidden_n @ weight.T + bias) / T, and,
    without gradient, the entropy H_n = logsumexp(z_n) - sum_v softmax(z_n)_v z_nv.

    Backward: d log p / dz = onehot(target) - softmax(z), computed per chunk in the recomputed logits' own buffer.
    Matmuls run in `compute_dtype` (bf16 under autocast, like an autocast linear layer), the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, compute_dtype, with_entropy: bool):
        logps = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logps) if with_entropy else None
        lse_all = torch.empty_like(logps)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        for start in range(0, hidden.size(0), CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            z = _logits(hidden[rows], w, b, temperature, compute_dtype)
            lse = torch.logsumexp(z, dim=-1)
            lse_all[rows] = lse
            logps[rows] = z.gather(1, targets[rows, None])[:, 0] - lse
            if with_entropy:
                z_mean = torch.softmax(z, dim=-1).mul_(z).sum(-1)  # E_p[z]
                entropy[rows] = lse - z_mean
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.temperature, ctx.compute_dtype = temperature, compute_dtype
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        dtype, temperature = ctx.compute_dtype, ctx.temperature
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = grad_bias = None  # fp32 sums over the chunks
        for start in range(0, hidden.size(0), CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            g = grad_logps[rows].float() / temperature  # dz/dlogits = 1/T
            dz = _logits(hidden[rows], w, b, temperature, dtype)
            # softmax(z) in place, then dz = g * (onehot - softmax)
            dz.sub_(lse_all[rows, None]).exp_().mul_(-g[:, None])
            dz.scatter_add_(1, targets[rows, None], g[:, None])
            dz_c = dz.to(dtype)
            if need_h:
                grad_hidden[rows] = (dz_c @ w).to(hidden.dtype)
            if need_w:
                part = (dz_c.t() @ hidden[rows].to(dtype)).float()
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
            if need_b:
                grad_bias = dz.sum(0) if grad_bias is None else grad_bias.add_(dz.sum(0))
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def _logits(hidden, weight, bias, temperature, dtype) -> torch.Tensor:
    """fp32 (tokens, vocab) logits divided by the temperature; a fresh buffer the caller may overwrite."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = hidden.to(dtype) @ weight.t()
        if bias is not None:
            z = z + bias
    z = z.float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def completion_logps(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *,
                     temperature: float = 1.0, compute_entropy: bool = False, autocast=None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last `logits_to_keep` columns of `input_ids`, as TRL's
    `_get_per_token_logps_and_entropies` returns them: (B, logits_to_keep), 0 where `attention_mask` is 0.

    `causal_lm` is the (unwrapped, PEFT-free) causal LM whose `base_model` is the backbone and whose output
    embedding is a plain `nn.Linear`. Each row's attended tokens are moved to the front (prompts arrive left-padded,
    completions right-padded): with rotary positions the result is the same, and the batch shrinks to its longest
    sequence instead of longest prompt + longest completion."""
    mask = attention_mask.bool()
    n_rows, width = input_ids.shape
    rank = mask.long().cumsum(1) - 1  # a token's column after repacking
    lengths = mask.sum(1)
    packed_width = int(lengths.max())
    rows, cols = mask.nonzero(as_tuple=True)
    packed = torch.zeros((n_rows, packed_width), dtype=input_ids.dtype, device=input_ids.device)
    packed[rows, rank[rows, cols]] = input_ids[rows, cols]
    packed_mask = torch.arange(packed_width, device=mask.device)[None, :] < lengths[:, None]

    scored = mask.clone()
    scored[:, : width - logits_to_keep] = False
    s_rows, s_cols = scored.nonzero(as_tuple=True)
    source = rank[s_rows, s_cols] - 1  # the position whose hidden state predicts the token
    if bool((source < 0).any()):
        raise ValueError("a scored token has no preceding token (empty prompt)")
    lm_head = causal_lm.get_output_embeddings()
    with autocast() if autocast is not None else torch.autocast(input_ids.device.type, enabled=False):
        hidden = causal_lm.base_model(input_ids=packed, attention_mask=packed_mask.long(),
                                      use_cache=False).last_hidden_state
        compute_dtype = (torch.get_autocast_dtype(hidden.device.type)
                         if torch.is_autocast_enabled(hidden.device.type) else lm_head.weight.dtype)
    logps, entropy = CompletionLogProbs.apply(hidden[s_rows, source], lm_head.weight, lm_head.bias,
                                              input_ids[s_rows, s_cols], float(temperature), compute_dtype,
                                              compute_entropy)
    out_cols = s_cols - (width - logits_to_keep)
    full = logps.new_zeros((n_rows, logits_to_keep)).index_put((s_rows, out_cols), logps)
    ent = None
    if entropy is not None:
        ent = entropy.new_zeros((n_rows, logits_to_keep)).index_put((s_rows, out_cols), entropy)
    return full, ent
