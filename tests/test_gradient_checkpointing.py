"""gradient_checkpointing=true: the layers' forward really runs again in the backward pass, and
a client's turn trains to the same tensors as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from fedtune.config import load_config
from fedtune.runtime.engine import build_federation, client_turn
from fedtune.runtime.simulator import Simulator


def one_turn(cls_file: Path, method: str, checkpointing: bool) -> tuple[dict, int]:
    overrides = tiny_overrides(cls_file, method=method, gradient_checkpointing=str(checkpointing).lower())
    fed = build_federation(load_config(None, overrides))
    sim = Simulator(fed)
    model = fed.loaded.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inside = base.bert.encoder.layer[0].intermediate  # a layer's own hooks stay outside its checkpoint
    calls = []
    handle = inside.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    turn = client_turn(fed, 0, 1, fed.method.download(sim.server, 0), {})
    handle.remove()
    return turn.upload, len(calls)


@pytest.mark.parametrize("method", ["fedit", "fedavg-full"])
def test_checkpointing_recomputes_and_trains_the_same(cls_file: Path, method: str) -> None:
    plain, plain_calls = one_turn(cls_file, method, False)
    checkpointed, checkpointed_calls = one_turn(cls_file, method, True)
    steps = load_config(None, tiny_overrides(cls_file)).local_steps
    assert plain_calls == steps  # one forward per step
    assert checkpointed_calls == 2 * steps  # and its recomputation in backward
    assert plain.keys() == checkpointed.keys()
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-6)
