"""The self-describing run directory every run writes.

    config.yaml            the resolved configuration (re-runnable with `fedtune run config.yaml`)
    metrics.jsonl          one JSON object per round
    summary.json           final and best metrics, totals, timings
    initial/global.safetensors  the trainable state before round 1 (for `fedtune analyze`)
    adapter/               the global adapter in PEFT format (full-weight methods: model/,
                           FLoRA: merged/merged_weights.safetensors)
    clients/<id>/adapter/  personal adapters, for methods with local parts
    plots/*.png            metrics vs round, primary metric vs cumulative uplink bytes
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from fedtune.errors import UsageError
from fedtune.state import State


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse to reuse a non-empty directory unless told to (before any work starts)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"run directory {path} already exists; pass --overwrite to replace it")


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDir:
        check_run_dir(path, overwrite)
        if path.is_dir() and overwrite:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").write_text("")
        return cls(path)

    def write_config(self, text: str) -> None:
        (self.path / "config.yaml").write_text(text)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(dict(row))) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(_jsonable(dict(summary)), indent=2) + "\n")

    def save_state(self, relative: str, state: State, metadata: Mapping[str, str] | None = None) -> Path:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata=dict(metadata or {}))
        return target

    def subdir(self, relative: str) -> Path:
        target = self.path / relative
        target.mkdir(parents=True, exist_ok=True)
        return target


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
