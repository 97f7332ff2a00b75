"""Methods lanpo adds to the workers of a `vllm serve` server (`--worker-extension-cls`), called over HTTP through
vLLM's `/collective_rpc` (dev mode): reload the weights from a file and remember which policy they are, so the rollout
engine can prove what every server serves before it generates.

Start a server for `rollout.backend: vllm-server` with

    VLLM_SERVER_DEV_MODE=1 vllm serve <model folder> --worker-extension-cls \
        lanpo_core.rollout.server_worker.LanpoWorkerExtension --logprobs-mode processed_logprobs ...

(lanpo must be importable by the server's Python). Arguments arrive as strings: vLLM passes only those.
"""

from __future__ import annotations


class LanpoWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def lanpo_load(self, weights_path: str, version: str) -> str:
        """Reload the weights from the safetensors in `weights_path` through vLLM's own reload path, then record
        `version`. Returns it."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        self._lanpo_version = version
        return version

    def lanpo_status(self) -> dict:
        """The version of the weights last loaded by `lanpo_load` ("base" before any) and the log-probs mode."""
        return {"version": getattr(self, "_lanpo_version", "base"),
                "logprobs_mode": str(self.vllm_config.model_config.logprobs_mode)}
