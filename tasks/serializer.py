"""Stage results as JSON instead of pickles.

Prefect persists every task result under the run folder and loads it back on a cache hit. With its default pickle
serializer, anyone who can write to that folder can run code in the next process that resumes the run. The stage
results are plain data (numbers, strings, lists, dicts, lanpo_core dataclasses), so they are stored as JSON, and
only dataclasses defined in `lanpo_core` are rebuilt on load; anything else in a result is refused when it is
written, naming its type.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections import Counter
from typing import Any, Literal

from prefect.serializers import Serializer

ALLOWED_PREFIX = "lanpo_core."
"""Modules whose dataclasses a result may hold (and loading may rebuild)."""


def encode(obj: Any) -> Any:
    """A JSON-ready form of `obj`: tuples, Counters, dicts with non-string keys and lanpo_core dataclasses are
    tagged so `decode` rebuilds them exactly."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, list):
        return [encode(x) for x in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x) for x in obj]}
    if isinstance(obj, Counter):
        return {"__counter__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith(ALLOWED_PREFIX):
            raise TypeError(f"stage result holds a {cls.__module__}.{cls.__qualname__}: only lanpo_core "
                            "dataclasses and plain data are stored")
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    raise TypeError(f"stage result holds a {type(obj).__module__}.{type(obj).__qualname__}, which is not stored "
                    "as JSON (plain data and lanpo_core dataclasses are)")


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(x) for x in data]
    if not isinstance(data, dict):
        return data
    if "__float__" in data:
        return float(data["__float__"])
    if "__tuple__" in data:
        return tuple(decode(x) for x in data["__tuple__"])
    if "__counter__" in data:
        return Counter({decode(k): decode(v) for k, v in data["__counter__"]})
    if "__items__" in data:
        return {decode(k): decode(v) for k, v in data["__items__"]}
    if "__dataclass__" in data:
        module, _, name = data["__dataclass__"].partition(":")
        if not module.startswith(ALLOWED_PREFIX):
            raise ValueError(f"stage result names {data['__dataclass__']!r}: only lanpo_core dataclasses are loaded")
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ValueError(f"stage result names {data['__dataclass__']!r}, which is not a dataclass")
        values = {k: decode(v) for k, v in data["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in values.items() if k in init})
        for k, v in values.items():
            if k not in init:
                object.__setattr__(obj, k, v)
        return obj
    return {k: decode(v) for k, v in data.items()}


class StageResultSerializer(Serializer):
    """Prefect serializer for lanpo's stage results (see the module docstring)."""

    type: Literal["lanpo-json"] = "lanpo-json"

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(encode(obj), ensure_ascii=False, allow_nan=False).encode("utf-8")

    def loads(self, blob: bytes) -> Any:
        return decode(json.loads(blob))
