"""`vllm-server` backend: rollouts from running `vllm serve` servers over HTTP, with weight sync and proof of it.

Generation uses the stock OpenAI-compatible `/v1/completions` endpoint with the prompt as token ids, one request per
row with the row's seed (so the samples are those the in-process engine draws for the same request), token ids and
the sampled tokens' log-probs returned. The rows of a call are spread round-robin over the servers (data parallel)
and sent concurrently. A dropped connection is retried with backoff; a server that stays down fails the call with
its URL.

Weight sync: the weights are written as one safetensors file to `rollout.server.sync_dir` (a path the servers see),
and every server reloads it through lanpo's worker extension (`server_worker.py`, via vLLM's dev-mode
`/collective_rpc`), which records a version string. Before each generation call every server is asked which
version it serves and which log-probs mode it runs; a server that serves anything else than the weights this engine
last synced is refused, naming it.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from ..config import RolloutConfig
from ..hardware import resolve_dtype
from .base import EngineBase, RolloutError, SamplingSpec, write_weights_file

log = logging.getLogger(__name__)

EXTENSION = "lanpo_core.rollout.server_worker.LanpoWorkerExtension"
_START_HINT = (f"start it with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {EXTENSION} "
               "(see lanpo_core/rollout/server_worker.py)")


class ServerUnavailable(RolloutError):
    """A server could not be reached (after the retries) or answered with an error."""


class VllmServerEngine(EngineBase):
    backend = "vllm-server"

    def __init__(self, model_path: str, rollout: RolloutConfig | None = None, *, logprobs_mode: str = "raw",
                 trust_remote_code: bool = False) -> None:
        import requests
        from transformers import AutoTokenizer

        rollout = rollout or RolloutConfig()
        sc = rollout.server
        if not sc.urls:
            raise RolloutError("rollout.server.urls is empty: name at least one running vLLM server")
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        super().__init__(tokenizer, max_prompt_tokens=rollout.max_prompt_tokens,
                         context_len=rollout.vllm.max_model_len, logprobs_mode=logprobs_mode,
                         progress=rollout.progress)
        self.urls = [u.rstrip("/") for u in sc.urls]
        self.timeout, self.retries = sc.timeout_seconds, sc.retries
        self.dtype = resolve_dtype(rollout.vllm.dtype)
        self._own_sync_dir = sc.sync_dir is None
        self.sync_dir = Path(sc.sync_dir or tempfile.mkdtemp(prefix="lanpo-server-sync-"))
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._requests = requests
        self.version = None  # the servers' current version, learnt below
        self.models = {url: self._served_model(url) for url in self.urls}
        versions = {url: self._status(url)["version"] for url in self.urls}
        if len(set(versions.values())) > 1:
            raise ServerUnavailable(f"the servers serve different weights: {versions}; restart them on one model")
        self.version = next(iter(versions.values()))
        log.info("vLLM servers %s (models %s, weights version %s)", self.urls, self.models, self.version)

    # -- HTTP
    def _session(self):
        if not hasattr(self._local, "session"):
            self._local.session = self._requests.Session()
        return self._local.session

    def _call(self, method: str, url: str, path: str, body: dict | None = None) -> Any:
        """One JSON request, retried with backoff on a failed or dropped connection."""
        errors = self._requests.exceptions
        for attempt in range(self.retries + 1):
            try:
                response = self._session().request(method, url + path, json=body, timeout=self.timeout)
            except (errors.ConnectionError, errors.Timeout) as e:
                if attempt == self.retries:
                    raise ServerUnavailable(f"vLLM server {url} is unreachable ({type(e).__name__}) after "
                                            f"{self.retries + 1} attempts") from None
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
                continue
            if response.status_code == 404 and path == "/collective_rpc":
                raise ServerUnavailable(f"vLLM server {url} has no /collective_rpc: {_START_HINT}")
            if response.status_code >= 400:
                raise ServerUnavailable(f"vLLM server {url} answered {response.status_code} to {path}: "
                                        f"{response.text[:300]}")
            return response.json() if response.content else None
        raise AssertionError("unreachable")

    def _rpc(self, url: str, method: str, **kwargs: str) -> list:
        out = self._call("POST", url, "/collective_rpc", {"method": method, "kwargs": kwargs,
                                                          "timeout": self.timeout})
        results = (out or {}).get("results")
        if not isinstance(results, list) or not results:
            raise ServerUnavailable(f"vLLM server {url}: /collective_rpc {method} returned {out!r}")
        return results

    def _served_model(self, url: str) -> str:
        data = self._call("GET", url, "/v1/models").get("data") or []
        if not data:
            raise ServerUnavailable(f"vLLM server {url} serves no model")
        return data[0]["id"]

    def _status(self, url: str) -> dict:
        """The worker extension's status: every worker must agree (tensor-parallel ranks)."""
        results = self._rpc(url, "lanpo_status")
        if any(not isinstance(r, dict) or "version" not in r for r in results):
            raise ServerUnavailable(f"vLLM server {url} does not run lanpo's worker extension ({results!r}): "
                                    f"{_START_HINT}")
        if len({(r["version"], r["logprobs_mode"]) for r in results}) > 1:
            raise ServerUnavailable(f"vLLM server {url}: its workers disagree: {results}")
        status = results[0]
        wanted = f"{self.logprobs_mode}_logprobs"
        if status["logprobs_mode"].lower().removeprefix("logprobsmode.") != wanted:
            raise ServerUnavailable(f"vLLM server {url} returns {status['logprobs_mode']} log-probs, this run needs "
                                    f"{wanted} (restart it with --logprobs-mode {wanted})")
        return status

    def check_servers(self) -> None:
        """Refuse to go on unless every server serves the weights this engine last synced."""
        for url in self.urls:
            served = self._status(url)["version"]
            if served != self.version:
                raise ServerUnavailable(f"vLLM server {url} serves weights version {served!r}, but this run synced "
                                        f"{self.version!r}: refusing to generate from other weights (restart or "
                                        "re-sync the server)")

    # -- generation
    def _generate_rows(self, rows, sampling: SamplingSpec):
        self.check_servers()
        started = time.perf_counter()
        targets = itertools.cycle(self.urls)
        jobs = [(row, next(targets)) for row in rows]
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(jobs)))) as pool:
            answers = list(pool.map(lambda job: self._complete(job[1], job[0], sampling), jobs))
        secs = time.perf_counter() - started
        results = {}
        for (i, _, n, _), choices in zip(rows, answers):
            for j, (ids, lps, reason, stop) in enumerate(choices):
                results[(i, j)] = (ids, lps, reason, stop, secs)
        return results

    def _complete(self, url: str, row, sampling: SamplingSpec) -> list[tuple]:
        i, ids, n, seed = row
        body: dict[str, Any] = {
            "model": self.models[url], "prompt": ids, "n": 1 if sampling.greedy else n,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop) or None, "seed": seed, "skip_special_tokens": True,
            "return_token_ids": True}
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        choices = sorted(self._call("POST", url, "/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            tokens = list(c.get("token_ids") or [])
            lps: list[float] = []
            if sampling.logprobs:
                lp = c.get("logprobs") or {}
                lps = [float(x) for x in lp.get("token_logprobs") or []]
                if len(lps) != len(tokens):
                    raise RolloutError(f"vLLM server {url} returned {len(lps)} log-probs for {len(tokens)} tokens "
                                       f"(request {i})")
            if c.get("finish_reason") not in ("stop", "length"):
                raise RolloutError(f"vLLM server {url}: request {i} ended with {c.get('finish_reason')!r}")
            stop = c.get("stop_reason") if isinstance(c.get("stop_reason"), str) else None
            out.append((tokens, lps, c["finish_reason"], stop))
        if sampling.greedy:
            out = out * n  # the n greedy samples are identical
        if len(out) != n:
            raise RolloutError(f"vLLM server {url} returned {len(out)} samples for request {i}, expected {n}")
        return out

    # -- weight sync
    def _load_weights(self, items: Iterable[tuple[str, Any]]) -> None:
        folder = write_weights_file(items, self.sync_dir, self.dtype)
        version = f"{self.policy_version + 1}-{uuid.uuid4().hex[:12]}"
        try:
            for url in self.urls:
                loaded = self._rpc(url, "lanpo_load", weights_path=str(folder), version=version)
                if any(v != version for v in loaded):
                    raise ServerUnavailable(f"vLLM server {url} loaded {loaded}, expected version {version}")
                self._call("POST", url, "/reset_prefix_cache")  # cached KV of the old weights must not be reused
        finally:
            (folder / "model.safetensors").unlink(missing_ok=True)
        self.version = version
        self.check_servers()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._own_sync_dir:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
