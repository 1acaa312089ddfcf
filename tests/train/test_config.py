"""Config schema and validation: every field documented, clear errors naming keys and values."""

from __future__ import annotations

import inspect
import os
import re

import ml_collections
import pytest

from jaxalign.train import config as config_lib
from jaxalign.train.config import ConfigError, base_config, config_diff, flatten, validate


def valid():
    c = base_config()
    c.model.path = "model"
    c.data.train = "pairs.jsonl"
    return c


def problems(c) -> str:
    with pytest.raises(ConfigError) as err:
        validate(c)
    return str(err.value)


def test_base_config_names_the_required_fields_and_validates():
    c = valid()
    assert validate(c) is c
    for name in ("seed", "steps", "log_every", "eval_every", "checkpoint_every"):
        assert name in c
    assert isinstance(c.steps, int) and isinstance(c.seed, int)


def test_every_field_has_a_one_line_comment():
    source = inspect.getsource(config_lib.base_config)
    assignments = [line for line in source.splitlines() if re.match(r"\s+c(\.\w+)+ = ", line)]
    assert len(assignments) >= 60
    undocumented = [line.strip() for line in assignments if "#" not in line]
    assert not undocumented, undocumented


def test_base_config_is_locked_against_typos():
    c = base_config()
    with pytest.raises(AttributeError, match="learning_rate"):
        c.optimizer.learnig_rate = 1e-5


def test_unknown_keys_get_close_matches():
    raw = valid().to_dict()
    raw["optimizer"]["learnig_rate"] = 1e-5
    raw["stpes"] = 3
    message = problems(ml_collections.ConfigDict(raw))
    assert "unknown config key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'" in message
    assert "unknown config key 'stpes'; did you mean 'steps'" in message


def test_values_outside_the_allowed_set_name_the_allowed_values():
    c = valid()
    c.optimizer.name = "adam"
    c.reference.mode = "cached"
    message = problems(c)
    assert "'optimizer.name' = 'adam' is not allowed (did you mean 'adamw'?); allowed: adamw, sgd, adafactor" in message
    assert "'reference.mode' = 'cached' is not allowed; allowed: frozen, precomputed, none" in message


def test_wrong_types_are_named():
    raw = valid().to_dict()
    raw["steps"] = "ten"
    raw["data"]["packing"] = 1
    message = problems(ml_collections.ConfigDict(raw))
    assert "'steps' must be of type int, got 'ten'" in message
    assert "'data.packing' must be of type bool, got 1" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"data.batch_size": 8, "data.micro_batch_size": 3}, "must be a multiple of 'data.micro_batch_size' = 3"),
        ({"data.max_prompt_length": 512, "data.max_length": 512}, "must be smaller than 'data.max_length'"),
        ({"loss.epsilon": 0.5}, "'loss.epsilon' must be in [0, 0.5), got 0.5"),
        ({"loss.label_smoothing": -0.1}, "'loss.label_smoothing' must be in [0, 0.5)"),
        ({"steps": 0, "epochs": 0.0}, "'steps' and 'epochs' are both 0"),
        ({"data.batch_size": 0}, "'data.batch_size' must be >= 1"),
        ({"optimizer.learning_rate": 0.0}, "'optimizer.learning_rate' must be > 0, got 0.0"),
        ({"loss.beta": -1.0}, "'loss.beta' must be > 0, got -1.0"),
        ({"loss.beta": 0.0}, "'loss.beta' must be > 0, got 0.0"),
        ({"loss.vpo_alpha": -1.0}, "'loss.vpo_alpha' must be >= 0, got -1.0"),
        ({"optimizer.b2": 1.0}, "'optimizer.b2' must be in [0, 1), got 1.0"),
        ({"optimizer.end_factor": 1.5}, "'optimizer.end_factor' must be in [0, 1], got 1.5"),
        ({"mesh.fsdp": 0}, "'mesh.fsdp' must be >= 1 or -1"),
        ({"model.path": ""}, "'model.path' is empty"),
        ({"max_consecutive_nonfinite": -1}, "'max_consecutive_nonfinite' must be >= 0"),
        ({"debug.nan_at_steps": (2, 0)}, "'debug.nan_at_steps' must hold optimizer steps (ints >= 1), got (2, 0)"),
    ],
)
def test_cross_field_rules(change, expected):
    c = valid()
    for key, value in change.items():
        group, _, leaf = key.rpartition(".")
        (c[group] if group else c)[leaf] = value
    assert expected in problems(c)


def test_missing_groups_are_reported_once():
    message = problems(ml_collections.ConfigDict({"steps": 3}))
    assert "config key(s) missing" in message and "recipes must start from base_config()" in message
    assert message.count("missing") == 1


def test_config_diff_names_changed_keys():
    a, b = flatten(valid()), flatten(valid())
    b["loss.beta"] = 0.2
    b["steps"] = 5
    assert config_diff(a, b) == ["loss.beta", "steps"]
    assert config_diff(a, b, ignore=("steps",)) == ["loss.beta"]


def test_every_range_problem_is_its_own_line_and_nothing_loads():
    """Several bad values: one message each, all at once (validate reads no file)."""
    c = valid()
    c.loss.beta, c.loss.vpo_alpha, c.optimizer.warmup_steps, c.checkpoint.keep = -1.0, -1.0, -3, 0
    lines = problems(c).splitlines()[1:]
    assert len(lines) == 4, lines
    for key in ("loss.beta", "loss.vpo_alpha", "optimizer.warmup_steps", "checkpoint.keep"):
        assert sum(f"'{key}'" in line for line in lines) == 1, key


def test_docs_configuration_lists_every_check():
    """docs/configuration.md's tables name every ranged key with its range and every closed set."""
    from jaxalign.train.config import ALLOWED, RANGES, allowed_text, range_text

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = open(os.path.join(root, "docs", "configuration.md"), encoding="utf-8").read().splitlines()
    for key, bounds in RANGES.items():
        row = [r for r in rows if r.startswith(f"| `{range_text(bounds)}` |")]
        assert row and f"`{key}`" in row[0], key
    for key, values in ALLOWED.items():
        row = [r for r in rows if r.startswith(f"| `{key}` |")]
        assert row and row[0].split("|")[2].strip() == allowed_text(values), key
