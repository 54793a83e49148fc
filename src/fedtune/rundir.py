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
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.atomic import save_safetensors, write_text
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
        raise UsageError(f"run directory {path} already exists; pass --overwrite to replace it (or --resume to continue it)")


#: settings a resumed run may change: more rounds, and how it reports progress
RESUMABLE_CHANGES = ("rounds", "progress")


class RunDir:
    """A run's folder. Files are written atomically (``fedtune.atomic``).

    ``create(..., overwrite=True)`` does not delete the run it replaces: it moves it aside,
    and only :meth:`commit` (called once the new run has finished its first round) deletes
    it; :meth:`restore` (a run that failed before that) puts it back."""

    def __init__(self, path: Path, replaced: Path | None = None) -> None:
        self.path = Path(path)
        self._replaced = replaced

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDir:
        check_run_dir(path, overwrite)
        replaced = None
        if path.is_dir() and any(path.iterdir()):
            replaced = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(path, replaced)
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").write_text("")
        return cls(path, replaced)

    @classmethod
    def resume(cls, path: Path, config: Any) -> RunDir:
        """An existing run to continue: its stored config must equal ``config`` except for
        :data:`RESUMABLE_CHANGES`; those are recorded in ``config.yaml``."""
        from fedtune.config import dump_config, load_config

        stored_file = Path(path) / "config.yaml"
        if not stored_file.is_file():
            raise UsageError(f"--resume: {path} holds no run to resume (no config.yaml)")
        stored = load_config(stored_file).model_dump(mode="json")
        wanted = config.model_dump(mode="json")
        changed = sorted(_differences(stored, wanted))
        refused = [key for key in changed if key.split(".")[0] not in RESUMABLE_CHANGES]
        if refused:
            key = refused[0]
            raise UsageError(
                f"--resume: {key} differs from the run in {path} ({_lookup(stored, key)!r} there, {_lookup(wanted, key)!r} now); "
                f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}"
            )
        run_dir = cls(path)
        if changed:
            run_dir.write_config(dump_config(config))
        return run_dir

    def commit(self) -> None:
        """The new run has really started: the run it replaced is deleted now."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def restore(self) -> None:
        """The new run failed before :meth:`commit`: put the replaced run back."""
        if self._replaced is not None and self._replaced.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self._replaced, self.path)
            self._replaced = None

    def write_config(self, text: str) -> None:
        write_text(self.path / "config.yaml", text)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        # an append is not atomic; a torn last line is dropped by read_metrics / keep_rounds
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(dict(row))) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def keep_rounds(self, last_round: int) -> list[dict[str, Any]]:
        """Rewrite metrics.jsonl with the rows of rounds <= ``last_round`` (what a checkpoint
        covers) and return them: rows written after the last checkpoint are redone."""
        rows = [row for row in read_metrics(self.path) if row.get("round", 0) <= last_round] if (self.path / "metrics.jsonl").exists() else []
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_text(self.path / "summary.json", json.dumps(_jsonable(dict(summary)), indent=2) + "\n")

    def save_state(self, relative: str, state: State, metadata: Mapping[str, str] | None = None) -> Path:
        target = self.path / relative
        save_safetensors(target, state, metadata)
        return target

    def subdir(self, relative: str) -> Path:
        target = self.path / relative
        target.mkdir(parents=True, exist_ok=True)
        return target


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path``/metrics.jsonl; a torn last line (a run killed mid-write) is dropped."""
    lines = [line for line in (Path(path) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise UsageError(f"{Path(path) / 'metrics.jsonl'}: line {number + 1} is not JSON") from None
    return rows
