"""Every shipped config validates and names a real method, model and dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.data.sources import BUILTINS
from fedtune.methods import METHODS
from fedtune.models.loading import BUILTIN_MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_one_config_per_method() -> None:
    named = {load_config(path).method for path in CONFIGS}
    assert set(METHODS) <= named


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.model in BUILTIN_MODELS
    assert config.dataset in BUILTINS
