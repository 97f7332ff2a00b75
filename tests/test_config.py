"""Config loading: shipped configs validate, overrides apply, and bad input fails early with key, file and type."""

from __future__ import annotations

from pathlib import Path

import pytest

from lanpo_core.config import ConfigError, RolloutMix, RunConfig, build_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.source == str(path.resolve())
    assert cfg.rollout.num_generations >= 2


def test_tiny_and_grpo_configs_differ_only_in_mix_and_name():
    lanpo, grpo = (load_config(CONFIGS[0].parent / n).flat() for n in ("tiny-cpu.yaml", "grpo-tiny-cpu.yaml"))
    differing = {k for k in lanpo if lanpo[k] != grpo[k]}
    assert differing <= {"name", "lanpo.rollout_mix.plain", "lanpo.rollout_mix.reflection",
                         "lanpo.rollout_mix.abstraction", "lanpo.abstraction.max_new_tokens"}
    assert load_config(CONFIGS[0].parent / "grpo-tiny-cpu.yaml").lanpo.is_plain_grpo


def test_every_field_has_a_doc():
    missing = []

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            sub = info.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, prefix + name + ".")
    walk(RunConfig, "")
    assert missing == []


def test_overrides_apply_with_yaml_types():
    cfg = load_config(None, ["grpo.learning_rate=1e-6", "rollout.backend=transformers", "grpo.bf16=false",
                             "verify.extraction=[boxed]", "data.train.arithmetic.operations=['+', '*']"])
    assert cfg.grpo.learning_rate == 1e-6
    assert cfg.rollout.backend == "transformers"
    assert cfg.grpo.bf16 is False
    assert cfg.verify.extraction == ["boxed"]
    assert cfg.data.train.arithmetic.operations == ["+", "*"]


def test_digest_is_stable_and_sensitive():
    a, b = load_config(None), load_config(None)
    assert a.digest() == b.digest()
    assert load_config(None, ["seed=1"]).digest() != a.digest()


@pytest.mark.parametrize("override, fragments", [
    ("grpo.lr=1", ["unknown key 'grpo.lr'", "learning_rate"]),
    ("nosuch.x=1", ["unknown key 'nosuch.x'", "top level"]),
    ("grpo.learning_rate=fast", ["grpo.learning_rate", "expected a number", "'fast'"]),
    ("grpo.steps=-3", ["grpo.steps", "greater than or equal to 0"]),
    ("rollout.num_generations=2.5", ["rollout.num_generations", "expected an integer"]),
    ("rollout.backend=tpu", ["rollout.backend", "'auto', 'vllm', 'transformers' or 'vllm-server'"]),
    ("lanpo.rollout_mix.plain=0.9", ["lanpo.rollout_mix", "sum to 1"]),
    ("grpo", ["expected KEY=VALUE"]),
])
def test_bad_overrides_fail_with_key_and_expectation(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_file_names_file_key_and_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  learning_rate: [1, 2]\nrollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "grpo.learning_rate: expected a number" in text
    assert "rollout.temprature: unknown key" in text


def test_unparsable_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("grpo: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*line 2"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dataset_needs_its_source():
    with pytest.raises(ConfigError, match="format 'gsm8k' needs a `path`"):
        build_config({"data": {"train": {"format": "gsm8k"}}})
    with pytest.raises(ConfigError, match="min_digits"):
        build_config({"data": {"train": {"arithmetic": {"min_digits": 3, "max_digits": 2}}}})


@pytest.mark.parametrize("group, shares, expected", [
    (8, (0.5, 0.25, 0.25), {"plain": 4, "reflection": 2, "abstraction": 2}),
    (4, (0.5, 0.25, 0.25), {"plain": 2, "reflection": 1, "abstraction": 1}),
    (5, (0.5, 0.25, 0.25), {"plain": 3, "reflection": 1, "abstraction": 1}),
    (7, (1.0, 0.0, 0.0), {"plain": 7, "reflection": 0, "abstraction": 0}),
    (3, (0.0, 0.5, 0.5), {"plain": 0, "reflection": 2, "abstraction": 1}),
])
def test_mix_counts_sum_to_group(group, shares, expected):
    mix = RolloutMix(plain=shares[0], reflection=shares[1], abstraction=shares[2])
    assert mix.counts(group) == expected


def test_parse_override_values():
    assert parse_override("a.b=1e-6") == ("a.b", 1e-6)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello world") == ("a", "hello world")


def test_the_trainer_scores_at_the_behaviour_temperature_by_default():
    cfg = build_config({"rollout": {"temperature": 0.7}})
    assert cfg.trainer_temperature() == 0.7
    assert cfg.logprobs_mode() == "processed"  # the sampled distribution, at the same temperature
    at_one = build_config({"rollout": {"temperature": 1.0}})
    assert (at_one.trainer_temperature(), at_one.logprobs_mode()) == (1.0, "raw")
    explicit = build_config({"rollout": {"temperature": 0.7, "logprobs": "raw"}, "grpo": {"logprob_temperature": 1.0}})
    assert (explicit.trainer_temperature(), explicit.logprobs_mode()) == (1.0, "raw")


@pytest.mark.parametrize("tree, keys", [
    ({"rollout": {"temperature": 0.7, "logprobs": "processed"}, "grpo": {"logprob_temperature": 1.0}},
     "grpo.logprob_temperature"),
    ({"rollout": {"temperature": 0.7, "logprobs": "raw"}}, "rollout.logprobs"),
    ({"rollout": {"temperature": 0.7, "top_p": 0.9}}, "rollout.top_p"),
    ({"rollout": {"temperature": 0.7, "top_k": 20}}, "rollout.top_k"),
    ({"grpo": {"logprob_temperature": 0}}, "logprob_temperature"),
])
def test_sampling_and_trainer_log_probs_that_disagree_are_refused(tree, keys):
    with pytest.raises(ConfigError, match=keys.replace(".", r"\.")):
        build_config(tree)


def test_top_p_is_fine_when_no_weight_reads_the_sampling_log_probs():
    plain_only = {"plain": 1.0, "reflection": 0.0, "abstraction": 0.0}
    assert build_config({"rollout": {"temperature": 0.7, "top_p": 0.9}, "lanpo": {"rollout_mix": plain_only}})
    assert build_config({"rollout": {"temperature": 0.7, "top_p": 0.9},
                         "lanpo": {"offpolicy": {"correction": "none"}}})
