"""Stage results are stored as JSON and rebuilt exactly; nothing else is stored or loaded."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import pytest

from lanpo_core.feedback import FeedbackBatch, FeedbackContext
from lanpo_core.pool import LessonSet
from lanpo_core.rollout import Completion
from lanpo_core.runtime import PolicyRef
from lanpo_core.step import Rollout
from tasks.serializer import StageResultSerializer

S = StageResultSerializer()


def roundtrip(obj):
    blob = S.dumps(obj)
    json.loads(blob)  # plain JSON on disk
    return S.loads(blob)


def test_every_stage_result_type_round_trips_exactly():
    ctx = FeedbackContext(problem_id="p1", kind="abstraction",
                          messages=[{"role": "user", "content": "Lessons:\n- Check units.\nWhat is 2 + 2?"}],
                          source_ids=("run/0/p2/0", "run/0/p3/1"), context_text="- Check units.",
                          lessons=("Check units.",), audited=("Check units.",))
    lessons = LessonSet(source_ids=("run/0/p2/0",), lessons=("Check units.",), step=1, problem_id="p1",
                        problem_text="What is 2 + 2?", producer="policy", policy_version=3)
    batch = FeedbackBatch(contexts={("p1", "abstraction"): ctx}, stats=Counter({"abstraction/built": 1}),
                          new_lessons={"k1": lessons})
    completion = Completion(0, 1, {"problem_id": "p1", "kind": "plain"}, "4", [1, 2, 3], [7, 8], [-0.5, -1.25],
                            "stop", None, 0.5, 2)
    rollout = Rollout("p1", "plain", 0, [], "4", [1, 2, 3], [7, 8], [-0.5, float("-inf")], "stop", 2, None, "ok",
                      "4")
    policy = PolicyRef(3, "abc", "/runs/x/checkpoints/step-000003")
    metrics = {"eval/x/greedy": 0.5, "time/eval_seconds": float("nan")}
    for obj in (batch, [completion], [rollout], policy, 7, metrics):
        back = roundtrip(obj)
        assert type(back) is type(obj)
        if obj is metrics:
            assert back["eval/x/greedy"] == 0.5
            assert math.isnan(back["time/eval_seconds"])
        elif isinstance(obj, list) and obj[0] is rollout:
            assert back[0].logprobs == [-0.5, float("-inf")]
            assert back[0].__dict__.keys() == rollout.__dict__.keys()
            assert back[0].reward is None
        else:
            assert back == obj
    assert roundtrip(batch).contexts[("p1", "abstraction")].source_ids == ("run/0/p2/0", "run/0/p3/1")
    assert roundtrip(batch).stats == Counter({"abstraction/built": 1})


def test_foreign_objects_are_refused_when_written_and_when_loaded():
    @dataclass
    class Elsewhere:
        x: int

    with pytest.raises(TypeError, match="only lanpo_core dataclasses"):
        S.dumps([Elsewhere(1)])
    with pytest.raises(TypeError, match="set"):
        S.dumps({"a": {1, 2}})
    # a crafted result file cannot name something to call
    crafted = json.dumps({"__dataclass__": "os:system", "fields": {"command": "echo hi"}}).encode()
    with pytest.raises(ValueError, match="only lanpo_core dataclasses"):
        S.loads(crafted)
    with pytest.raises(ValueError, match="not a dataclass"):
        S.loads(json.dumps({"__dataclass__": "lanpo_core.step:train", "fields": {}}).encode())
