"""Run a tiny federation in-process and return the simulator (tests only)."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import load_config
from fedtune.rundir import RunDir
from fedtune.runtime.engine import build_federation
from fedtune.runtime.simulator import Simulator


def run_tiny(overrides: list[str], out: Path | None = None) -> tuple[Simulator, dict]:
    config = load_config(None, overrides)
    fed = build_federation(config)
    run_dir = RunDir.create(out, overwrite=True) if out is not None else None
    simulator = Simulator(fed, run_dir)
    summary = simulator.run()
    return simulator, summary
