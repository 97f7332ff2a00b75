"""What a run's results depend on besides its config: the pipeline's code, the problems' content and the models'
files. Their digest is part of the run's identity (its folder, so its cache keys and its MLflow run), so a fix to
the verifier, a corrected gold answer or a re-downloaded model gives a new run instead of a stale cache hit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

PACKAGES = ("lanpo_core", "tasks", "flows")
"""The Python packages whose sources the code digest covers (everything a stage calls that is ours)."""


@dataclass(frozen=True)
class Provenance:
    code: str
    """sha256 of the pipeline's Python sources (`PACKAGES`), by relative path and content."""
    data: str
    """sha256 of every loaded problem set: its name, and each problem's id and gold answer, in order."""
    models: str
    """sha256 of the policy's and embedder's fingerprints (`model_fingerprint`)."""

    def digest(self) -> str:
        return hashlib.sha256(f"{self.code}|{self.data}|{self.models}".encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """As MLflow tags."""
        return {f"{name}_digest": value[:16] for name, value in asdict(self).items()} | {"inputs_digest": self.digest()}


def source_files(packages: Iterable[str] = PACKAGES) -> list[tuple[str, Path]]:
    """(path relative to the package's parent, file) of every .py file of `packages`, sorted."""
    import importlib.util

    files = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"code digest: package {name!r} not found")
        root = Path(next(iter(spec.submodule_search_locations)))
        files += [(path.relative_to(root.parent).as_posix(), path) for path in sorted(root.rglob("*.py"))]
    return files


def code_digest(packages: Iterable[str] = PACKAGES) -> str:
    """sha256 over `source_files(packages)`: each relative path, then the file's bytes."""
    h = hashlib.sha256()
    for relative, path in source_files(packages):
        h.update(f"{relative}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def data_digest(problem_sets: Sequence[tuple[str, Sequence]]) -> str:
    """sha256 of (set name, [(problem id, gold answer), ...]) per set; ids hash the question, the answer is added
    here, so a corrected gold answer changes the digest."""
    blob = json.dumps([[name, [[p.id, p.answer] for p in problems]] for name, problems in problem_sets],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_fingerprint(spec: str, path: str, kind: str, revision: str | None = None) -> str:
    """What identifies a model's files without reading them all: a pinned `revision`; for a hub model the commit
    of its cached snapshot (or the bare name if it is not cached yet); for a folder, each file's relative path,
    size and modification time."""
    if revision:
        return f"{spec}@{revision}"
    if kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 - any hub-cache trouble means "not known": the name alone
            cached = None
        return f"{spec}@{Path(cached).parent.name}" if isinstance(cached, str) else f"{spec}@unresolved"
    root = Path(path)
    entries = [f"{p.relative_to(root).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
               for p in sorted(root.rglob("*")) if p.is_file()]
    return f"{spec}:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()


def provenance(problem_sets: Sequence[tuple[str, Sequence]], model_fingerprints: Sequence[str]) -> Provenance:
    return Provenance(code=code_digest(), data=data_digest(problem_sets),
                      models=hashlib.sha256("\n".join(model_fingerprints).encode()).hexdigest())
