"""Shared fixtures: tiny datasets on disk, tiny-model runs, the shared data folder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = [
    "apple", "river", "engine", "planet", "guitar", "forest", "market", "signal", "winter", "castle",
    "rocket", "garden", "silver", "thunder", "window", "harbor", "puzzle", "mirror", "canyon", "meadow",
]  # fmt: skip


def shared_data_dir() -> Path | None:
    chosen = os.environ.get("FEDTUNE_DATA_DIR")
    path = Path(chosen) if chosen else SHARED_DATA
    return path if (path / "README.md").exists() else None


requires_shared_data = pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is not present")


def write_classification_jsonl(path: Path, rows: int = 80, labels: int = 4, seed: int = 0) -> Path:
    """Rows whose label is recoverable from their words (label k uses words 5k..5k+4)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            label = i % labels
            words = [rng.choice(WORDS[5 * label : 5 * label + 5]) for _ in range(rng.randint(4, 12))]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def write_instruction_jsonl(path: Path, rows: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            f.write(
                json.dumps(
                    {"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}.", "category": f"c{i % 2}"}
                )
                + "\n"
            )
    return path


def write_image_folder(path: Path, per_class: int = 12, labels: int = 4, size: int = 16, seed: int = 0) -> Path:
    """An image folder (one sub-folder per class) whose class is visible: class k is a
    bright square in quadrant k on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    half = size // 2
    for label in range(labels):
        folder = path / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
            row, col = divmod(label % 4, 2)
            pixels[row * half : (row + 1) * half, col * half : (col + 1) * half] += 180
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def cls_file(tmp_path: Path) -> Path:
    return write_classification_jsonl(tmp_path / "cls.jsonl")


@pytest.fixture
def gen_file(tmp_path: Path) -> Path:
    return write_instruction_jsonl(tmp_path / "gen.jsonl")


def tiny_overrides(dataset: Path, **extra: object) -> list[str]:
    """key=value overrides for a fast tiny-bert run on ``dataset``."""
    settings: dict[str, object] = {
        "model": "tiny-bert",
        "dataset": str(dataset),
        "clients": 4,
        "rounds": 2,
        "local_steps": 2,
        "batch_size": 4,
        "eval_batch_size": 16,
        "max_seq_len": 32,
        "partition": "iid",
        "lr": 0.01,
        "lora.r": 4,
        "progress": "false",
        "device": "cpu",
        "threads": 1,
        # exact comparisons (simulator vs Flower, resumed vs uninterrupted) are made in fp32;
        # precision=auto has its own tests
        "precision": "fp32",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


# name -> overrides; every method, homogeneous and heterogeneous
METHOD_CASES: dict[str, dict[str, object]] = {
    "fedit": {"method": "fedit"},
    "ffa-lora": {"method": "ffa-lora"},
    "fedsa-lora": {"method": "fedsa-lora"},
    "fed-alora": {"method": "fed-alora"},
    "fed-alora-keep": {"method": "fed-alora", "fed_alora.a_persistence": "keep"},
    "local-only": {"method": "local-only"},
    "fedavg-full": {"method": "fedavg-full"},
    "fedavg-galore": {"method": "fedavg-galore", "galore.rank": 2},
    "hetlora": {"method": "hetlora", "ranks": "[2,4,8,8]"},
    "flexlora": {"method": "flexlora", "ranks": "[2,4,8,8]"},
    "flora": {"method": "flora", "ranks": "[2,4,8,8]"},
    "fed-alora-decomposed": {"method": "fed-alora", "ranks": "[2,4,8,8]"},
    "hafl-freezing": {"method": "hafl", "ranks": "[2,4,8,8]"},
    "hafl-truncation": {"method": "hafl", "ranks": "[2,4,8,8]", "hafl.scheme": "truncation"},
    "rolora": {"method": "rolora"},
    "fedsvd": {"method": "fedsvd"},
    "fedex-lora": {"method": "fedex-lora"},
    "fedit-scaffold": {"method": "fedit", "scaffold.enabled": "true"},
    "fedit-fedprox": {"method": "fedit", "fedprox.mu": 0.1},
    "fedsa-fedadam": {"method": "fedsa-lora", "server_opt.name": "fedadam", "server_opt.lr": 0.05},
}
