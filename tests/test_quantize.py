"""quantize=4bit|8bit: the frozen base through bitsandbytes, on CPU here (bitsandbytes' CPU
backend trains both); LoRA, heads and everything that travels stay float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import requires_shared_data, shared_data_dir, tiny_overrides, write_classification_jsonl
from helpers import run_tiny

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.errors import UsageError
from fedtune.runtime.engine import build_federation

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("method", ["fedit", "fed-alora", "hetlora", "hafl"])
def test_8bit_base_trains_lora_and_stays_int8(cls_file: Path, method: str) -> None:
    ranks = {"ranks": "[2,4,4,4]"} if method in ("hetlora", "hafl") else {}
    sim, summary = run_tiny(tiny_overrides(cls_file, method=method, quantize="8bit", rounds=2, **ranks))
    model = sim.fed.loaded.model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert quantized and all(m.weight.dtype == torch.int8 for m in quantized)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for name, m in model.named_modules() if "classifier" in name)
    assert all(v.dtype == torch.float32 for v in sim.server.values() if v.is_floating_point())
    assert summary["quantize"] == "8bit" and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in sim.history)
    moved = [k for k, v in sim.server.items() if k.endswith("lora_B") and v.abs().max() > 0]
    assert moved or method == "fed-alora"  # B starts at zero and trains


def test_8bit_halves_the_stored_base_and_keeps_the_same_adapter_shapes(cls_file: Path) -> None:
    plain = build_federation(load_config(None, tiny_overrides(cls_file)))
    quantized = build_federation(load_config(None, tiny_overrides(cls_file, quantize="8bit")))
    from fedtune.runtime.engine import describe

    assert describe(quantized)["model_bytes"] < describe(plain)["model_bytes"]
    assert {k: v.shape for k, v in plain.initial_state(0).items()} == {k: v.shape for k, v in quantized.initial_state(0).items()}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "fedavg-full", "quantize": "4bit"}, "trains the base weights"),
        ({"method": "flora", "ranks": "[2,4,8,8]", "quantize": "8bit"}, "merges updates into the base weights"),
        ({"method": "fedex-lora", "quantize": "8bit"}, "merges updates into the base weights"),
        ({"method": "fedit", "quantize": "4bit"}, "multiple of 64"),  # tiny-bert is 32 wide
    ],
)
def test_what_cannot_train_on_a_quantised_base_is_refused(cls_file: Path, overrides: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_federation(load_config(None, tiny_overrides(cls_file, **overrides)))


@pytest.mark.slow
@requires_shared_data
def test_4bit_minilm_trains_and_exports_a_float_adapter(tmp_path: Path) -> None:
    """QLoRA on the real MiniLM (384 wide: bitsandbytes' CPU 4-bit path applies)."""
    data = write_classification_jsonl(tmp_path / "rows.jsonl", rows=48)
    out = tmp_path / "run"
    overrides = tiny_overrides(data, model="minilm", method="fedit", quantize="4bit", rounds=2, clients=2, local_steps=2)
    assert main(["run", f"data_dir={shared_data_dir()}", *overrides, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantize"] == "4bit"
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
