"""Transformers backend: batched, left-padded `generate` on an in-process model, the fallback where vLLM cannot run.

It can hold the trainer's own model object, so weight sync is free (by reference). The same seed, weights and
requests give identical completions; the global torch RNG is forked, so the caller's RNG state is untouched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .base import EngineBase, RolloutError, SamplingSpec, derive_seed, eos_token_ids


class _LogprobRecorder:
    """A logits processor that records the log-prob of each sampled token without keeping the vocab-sized scores.

    At step t it sees the token sampled at step t-1 (last column of `input_ids`) and gathers its log-prob from the
    log-softmax it stored at t-1; the final step's token is gathered by `finalize`. Placed first in the processor
    list it sees raw logits; placed after the warpers it sees the processed distribution."""

    def __init__(self, bar: Any = None) -> None:
        self.pending = None
        self.steps: list[Any] = []
        self.bar = bar

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1).cpu())
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        if self.bar is not None:
            self.bar.update(1)
        return scores

    def finalize(self, sequences: Any) -> Any:
        import torch

        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sequences[:, -1:]).squeeze(1).cpu())
            self.pending = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros((sequences.shape[0], 0))


class TransformersEngine(EngineBase):
    """Batched transformers `generate` (left padding, `transformers_batch_size` sequences per call)."""

    backend = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, max_prompt_tokens: int = 1024, logprobs_mode: str = "raw",
                 batch_size: int = 64, progress: bool = True, dtype: str = "float32") -> None:
        context_len = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
        super().__init__(tokenizer, max_prompt_tokens=max_prompt_tokens, context_len=context_len,
                         logprobs_mode=logprobs_mode, progress=progress)
        if dtype not in ("float32", "bfloat16"):
            raise RolloutError(f"transformers compute dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.model = model
        self.batch_size = batch_size
        self.dtype = dtype
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise RolloutError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id = int(pad)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _generate_rows(self, rows, sampling: SamplingSpec):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        flat = [(i, j, ids) for i, ids, n, _ in rows for j in range(n)]
        # similar lengths together: less padding; the order is a pure function of the requests (determinism)
        flat.sort(key=lambda r: (len(r[2]), r[0], r[1]))
        batches = [flat[k: k + self.batch_size] for k in range(0, len(flat), self.batch_size)]
        eos = sorted(eos_token_ids(self.tokenizer))
        # our own warpers (below) do the sampling transforms, so that the recorder can sit before or after them
        neutral = {} if sampling.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        gen_config = GenerationConfig(
            do_sample=not sampling.greedy, **neutral, max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=eos or None, use_cache=True, num_beams=1,
            stop_strings=list(sampling.stop) or None, return_dict_in_generate=False)
        warpers: list[Any] = []
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        show = self.progress and len(flat) > self.batch_size
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches) * sampling.max_new_tokens, desc=f"generate {len(flat)} seqs", unit="step",
                       leave=False)
        results: dict = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for b, batch in enumerate(batches):
                started = time.perf_counter()
                width = max(len(r[2]) for r in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for k, (_, _, ids) in enumerate(batch):
                    input_ids[k, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention[k, width - len(ids):] = 1
                recorder = _LogprobRecorder(bar)
                procs = [recorder, *warpers] if self.logprobs_mode == "raw" else [*warpers, recorder]
                rng = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
                # bf16 autocast over the fp32 weights: the engine shares the trainer's model object
                autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
                with rng, torch.inference_mode(), autocast:
                    if sampling.seed is not None:
                        torch.manual_seed(derive_seed(sampling.seed, b))
                    seq = self.model.generate(
                        input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                        generation_config=gen_config, logits_processor=LogitsProcessorList(procs),
                        tokenizer=self.tokenizer if sampling.stop else None)
                new = seq[:, width:].cpu()
                lps = recorder.finalize(seq.cpu()) if new.shape[1] else torch.zeros((len(batch), 0))
                secs = time.perf_counter() - started
                if bar is not None:
                    bar.update(max(0, sampling.max_new_tokens - new.shape[1]))
                for k, (i, j, _) in enumerate(batch):
                    results[(i, j)] = (new[k].tolist(), lps[k].tolist(), "length", None, secs)
        finally:
            if was_training:
                self.model.train()
            if bar is not None:
                bar.close()
        return results

    def _load_weights(self, items):
        import torch

        own = self.model.state_dict()
        missing = []
        with torch.no_grad():
            for name, tensor in items:
                target = own.get(name)
                if target is None:
                    missing.append(name)
                    continue
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor.to(target.dtype))
        if missing:
            raise RolloutError(f"{len(missing)} weight names are not in the engine's model, e.g. {missing[:3]}")

    def sync_from(self, model: Any) -> float:
        """The trainer's own model object: nothing to copy (the engine reads it by reference)."""
        self._check_open()
        if model is self.model:
            self.policy_version += 1
            self.stats["syncs"] += 1
            self.stats["last_sync_seconds"] = 0.0
            return 0.0
        return super().sync_from(model)

    def close(self) -> None:
        if not self.closed:
            self.model = None
        super().close()
