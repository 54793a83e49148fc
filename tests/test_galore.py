"""GaLore really projects: the optimizer state of weight matrices has the low-rank shape."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_overrides

from fedtune.config import load_config
from fedtune.methods.full_weight import FedAvgFull, FedAvgGaLore, GaLoreSettings
from fedtune.runtime.engine import build_federation


def _one_step(method, fed) -> torch.optim.Optimizer:
    params = fed.binding.set_trainable(fed.binding.keys)
    optimizer = method.make_optimizer(params, 1e-3, 0.0, fed.binding.matrix_keys)
    out = fed.binding.model(input_ids=torch.tensor([[101, 2023, 102]]), labels=torch.tensor([0]))
    out.loss.backward()
    optimizer.step()
    return optimizer


def test_galore_state_is_low_rank_and_adamw_is_not(cls_file: Path) -> None:
    fed = build_federation(load_config(None, tiny_overrides(cls_file, method="fedavg-galore", **{"galore.rank": 2})))
    params = fed.binding.params
    matrices = [k for k in fed.binding.matrix_keys]
    assert matrices, "tiny-bert's target weights should be projectable matrices"
    galore_opt = _one_step(FedAvgGaLore(GaLoreSettings(rank=2)), fed)
    for key in matrices:
        state = galore_opt.state[params[key]]
        shape = tuple(params[key].shape)
        assert "projector" in state
        assert state["exp_avg"].shape != shape
        assert 2 in state["exp_avg"].shape and state["exp_avg"].numel() < params[key].numel()
    group = next(g for g in galore_opt.param_groups if "rank" in g)
    assert group["rank"] == 2 and {"update_proj_gap", "scale", "proj_type"} <= set(group)

    adam_opt = _one_step(FedAvgFull(), fed)
    for key in matrices:
        assert adam_opt.state[params[key]]["exp_avg"].shape == params[key].shape


def test_galore_ignores_heads_and_biases(cls_file: Path) -> None:
    fed = build_federation(load_config(None, tiny_overrides(cls_file, method="fedavg-galore")))
    assert not [k for k in fed.binding.matrix_keys if k.startswith("classifier") or k.endswith("bias")]
    assert [k for k in fed.binding.params if k.startswith("classifier")], "the head is trained and averaged"


def test_client_training_memory_is_reported_and_galore_is_smaller(cls_file: Path) -> None:
    from helpers import run_tiny

    full, _ = run_tiny(tiny_overrides(cls_file, method="fedavg-full", rounds=1))
    galore, _ = run_tiny(tiny_overrides(cls_file, method="fedavg-galore", rounds=1, **{"galore.rank": 2}))
    lora, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=1))
    memory = {name: sim.history[0]["client_train_state_bytes"] for name, sim in (("full", full), ("galore", galore), ("lora", lora))}
    assert memory["lora"] < memory["galore"] < memory["full"]
    params = sum(p.numel() * 4 for k, p in full.fed.binding.params.items())
    step_counters = 8 * len(full.fed.binding.params)  # AdamW keeps one scalar step per tensor
    assert 4 * params <= memory["full"] <= 4 * params + step_counters  # values, gradients, two moments
