"""Every shipped config validates and names a real method, model and dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.data.sources import BUILTINS
from fedtune.methods import METHODS
from fedtune.models.loading import BUILTIN_MODELS

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
# studies and their sweeps are comparison files (test_studies.py); the studies' shared bases are run configs
CONFIGS = [p for p in ALL if p.parent.name != "multitask" and ("studies" not in p.parts or p.parent.name == "bases")]
MULTITASK = [p for p in ALL if p.parent.name == "multitask"]


def test_one_config_per_method() -> None:
    named = {load_config(path).method for path in CONFIGS}
    assert set(METHODS) - {"fed-alora-decomposed"} <= named  # chosen by fed-alora with mixed ranks


def test_heterogeneous_configs_cover_both_tasks_and_tiers() -> None:
    hetero = [load_config(p) for p in CONFIGS if p.parent.name == "hetero"]
    for method in ("hetlora", "flexlora", "flora", "fed-alora", "hafl"):
        tasks = {(c.model, c.dataset, tuple(sorted(c.ranks))) for c in hetero if c.method == method}
        assert ("minilm", "20newsgroups", (2, 4, 8)) in tasks, method
        assert ("smollm2-135m", "dolly15k", (4, 8, 16)) in tasks, method


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.model in BUILTIN_MODELS
    names = [config.dataset] if isinstance(config.dataset, str) else config.dataset
    assert all(name in BUILTINS for name in names)


@pytest.mark.parametrize("path", MULTITASK, ids=[p.stem for p in MULTITASK])
def test_multitask_config_validates(path: Path) -> None:
    from fedtune.multitask.config import load_multitask_config

    config = load_multitask_config(path)
    assert config.model in BUILTIN_MODELS and config.variant in ("alora", "hydralora", "lora")


def test_multitask_configs_cover_glue_and_dolly() -> None:
    from fedtune.multitask.config import load_multitask_config

    configs = [load_multitask_config(p) for p in MULTITASK]
    for variant in ("alora", "hydralora", "lora"):
        assert any(c.variant == variant and c.model == "minilm" and c.tasks and "glue/sst2" in c.tasks for c in configs)
        assert any(c.variant == variant and c.model == "smollm2-135m" and c.dataset == "dolly15k" for c in configs)
