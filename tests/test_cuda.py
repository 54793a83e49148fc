"""The CUDA and bf16-autocast paths. Skipped where there is no GPU (CI has none); run on a GPU
machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny

from fedtune.runtime.local_training import autocast
from fedtune.state import max_abs_diff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_bf16_autocast_runs_matmuls_in_bf16_and_fp32_does_not() -> None:
    layer = torch.nn.Linear(16, 16).to(CUDA)
    x = torch.randn(4, 16, device=CUDA)
    with autocast(CUDA, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(CUDA, "fp32"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # master weights stay fp32 under autocast


@pytest.mark.parametrize("method", ["fedit", "fed-alora", "fedavg-full", "fedavg-galore"])
def test_tiny_llama_federation_trains_on_cuda_in_bf16(gen_file: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(gen_file, model="tiny-llama", method=method, device="cuda", precision="bf16", rounds=2)
    sim, summary = run_tiny(overrides, out)
    assert summary["device"].startswith("cuda")
    assert all(p.is_cuda for p in sim.fed.loaded.model.parameters())
    assert summary["gpu_peak_memory_bytes"] > 0
    assert summary["train_tokens_per_second"] > 0
    assert math.isfinite(summary["final_train_loss"])
    assert all(math.isfinite(v) for v in summary["final"].values())
    initial = sim.fed.initial_state()
    shared = {k: initial[k] for k in sim.server}  # Fed-ALoRA's server holds B only; its A's stay on the clients
    assert max_abs_diff(sim.server, shared) > 0, "the global state should move"
    exported = out / ("model" if method.startswith("fedavg-") else "adapter")
    assert any(exported.glob("*.safetensors"))


def test_same_seed_reproduces_a_cuda_bf16_run(gen_file: Path) -> None:
    overrides = tiny_overrides(gen_file, model="tiny-llama", method="fedit", device="cuda", precision="bf16", seed=5)
    _, first = run_tiny(overrides)
    _, second = run_tiny(overrides)
    assert first["final"] == second["final"]
    assert first["final_train_loss"] == second["final_train_loss"]
