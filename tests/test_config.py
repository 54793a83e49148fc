"""Config parsing: YAML values in overrides, nested keys, validation messages."""

from __future__ import annotations

import pytest

from fedtune.config import RunConfig, load_config, parse_overrides
from fedtune.errors import UsageError


def test_overrides_parse_yaml_values_and_nest() -> None:
    tree = parse_overrides(["lora.r=16", "rounds=3", "lr=0.001", "progress=false", "lora.target_modules=[query,value]"])
    assert tree == {"lora": {"r": 16, "target_modules": ["query", "value"]}, "rounds": 3, "lr": 1e-3, "progress": False}
    # YAML 1.1 reads 1e-3 as a string; validation still makes it the float
    assert load_config(None, ["lr=1e-3"]).lr == 1e-3


def test_defaults_are_the_demo_job() -> None:
    config = RunConfig()
    assert (config.method, config.model, config.dataset, config.partition) == ("fed-alora", "minilm", "20newsgroups", "dirichlet")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.r=0"], "invalid config: lora.r: Input should be greater than 0 (got 0)"),
        (["clients=0"], "invalid config: clients"),
        (["fraction=1.5"], "invalid config: fraction"),
        (["clients=4", "clients_per_round=5"], "exceeds clients=4"),
        (["rounds"], "not key=value"),
        (["fed_alora.a_persistence=sometimes"], "fed_alora.a_persistence"),
    ],
)
def test_invalid_values_raise_usage_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_sampled_per_round() -> None:
    assert load_config(None, ["clients=10", "fraction=0.3"]).sampled_per_round == 3
    assert load_config(None, ["clients=10", "clients_per_round=4"]).sampled_per_round == 4
