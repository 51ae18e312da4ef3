import dataclasses

import pytest

from jaxpost import cli
from jaxpost.recipes.sft import SFTConfig


def test_config_round_trips_through_config_dict_with_overrides():
    cfg = SFTConfig()
    cd = cli.to_config_dict(cfg)
    assert cli.from_config_dict(SFTConfig, cd) == cfg
    cd.steps = 7
    cd.model.n_layers = 3
    cd.train_jsonl = "data.jsonl"  # a None default is a typed placeholder: it can be set
    cd.task.ops = ("+",)
    out = cli.from_config_dict(SFTConfig, cd)
    assert (out.steps, out.model.n_layers, out.train_jsonl, out.task.ops) == (7, 3, "data.jsonl", ("+",))
    assert dataclasses.is_dataclass(out.model)


def test_invalid_values_and_unknown_fields_are_named():
    cd = cli.to_config_dict(SFTConfig())
    cd.data.overlong = "wrap"
    with pytest.raises(ValueError, match="overlong"):
        cli.from_config_dict(SFTConfig, cd)
    with pytest.raises(ValueError, match="unknown config field"):
        cli.from_config_dict(SFTConfig, {**cli.to_config_dict(SFTConfig()).to_dict(), "stpes": 3})
