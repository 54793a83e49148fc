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


def train_with_hooks(method, start: dict, local: dict, grad_for, steps: int = 3, lr: float = 0.1, direction=None) -> dict:
    """A method's local-training contract without a model: ``grad_for(key, param, step)`` gives
    each trainable tensor's gradient; plain SGD steps (or ``param -= lr * direction(grad)``, an
    optimizer that rescales the gradient); the method's hooks run as in
    ``client_turn`` (after_backward, step, after_step, then extras merged into the trained
    state). Returns the trained state (bookkeeping keys of ``start`` included)."""
    import torch

    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items() if not k.startswith("_") and method.trains(k)}
    hooks = method.local_hooks(start, local)
    for step in range(steps):
        for key, param in params.items():
            param.grad = grad_for(key, param.detach().clone(), step)
        if hooks is not None:
            hooks.after_backward(params)
        with torch.no_grad():
            for param in params.values():
                param -= lr * (param.grad if direction is None else direction(param.grad))
        if hooks is not None:
            hooks.after_step(params)
    trained = {k: v.clone() for k, v in start.items()}
    trained.update({k: p.detach().clone() for k, p in params.items()})
    if hooks is not None:
        trained.update(hooks.extras())
    return trained
