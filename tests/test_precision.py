"""precision=auto: bf16 autocast where the hardware has it, float32 everywhere it matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny

from fedtune.data.encode import Example
from fedtune.models.loading import load_model
from fedtune.runtime import local_training
from fedtune.runtime.evaluation import evaluate_classification
from fedtune.runtime.local_training import resolve_precision
from fedtune.state import is_bookkeeping


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_training, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"  # forced either way


def test_cpu_flags_decide_native_bf16() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert local_training.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("method", ["fedit", "hafl"])
def test_a_bf16_run_keeps_float32_state_records_its_precision_and_repeats_exactly(
    cls_file: Path, tmp_path: Path, method: str
) -> None:
    extra = {"method": method, "precision": "bf16"} | ({"ranks": "[2,4,4,4]"} if method == "hafl" else {})
    first, summary = run_tiny(tiny_overrides(cls_file, **extra), tmp_path / "a")
    second, _ = run_tiny(tiny_overrides(cls_file, **extra), tmp_path / "b")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["precision"] == "bf16" == summary["precision"]
    floating = {k: v.dtype for k, v in first.server.items() if v.is_floating_point() and not is_bookkeeping(k)}
    assert floating and set(floating.values()) == {torch.float32}  # autocast computes; state stays float32
    assert [r["accuracy"] for r in first.history] == [r["accuracy"] for r in second.history]
    assert all(torch.equal(first.server[k], second.server[k]) for k in first.server)


def test_auto_records_what_it_resolved_to(cls_file: Path) -> None:
    _, summary = run_tiny(tiny_overrides(cls_file, precision="auto", rounds=1))
    assert summary["precision"] == resolve_precision("auto", torch.device("cpu"))


def test_sorted_batches_score_like_one_example_at_a_time() -> None:
    """Evaluation sorts examples by length so batches carry little padding; in fp32 that
    changes nothing: the same accuracy and loss as unpadded one-by-one scoring, in any order."""
    model = load_model("tiny-bert", "classification", num_labels=3, seed=0).model.eval()
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(5, 100, (int(n),), generator=g), int(n) % 3, int(n)) for n in torch.randint(3, 30, (23,), generator=g)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        logits = torch.cat([model(input_ids=e.input_ids[None]).logits for e in examples])
    labels = torch.tensor([e.labels for e in examples])
    expected_accuracy = int((logits.argmax(-1) == labels).sum()) / len(examples)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    for order in (examples, examples[::-1]):
        got = evaluate_classification(model, order, batch_size=8, pad_id=0, device=cpu, precision="fp32")
        assert got["accuracy"] == expected_accuracy
        assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_bf16_really_computes_in_bf16(cls_file: Path) -> None:
    """The autocast is live: a bf16 run trains to different values than the fp32 run (and
    close to them), from the same seed and batches."""
    bf16, _ = run_tiny(tiny_overrides(cls_file, method="fedit", precision="bf16", rounds=1))
    fp32, _ = run_tiny(tiny_overrides(cls_file, method="fedit", precision="fp32", rounds=1))
    keys = [k for k in fp32.server if k.endswith("lora_B")]
    assert keys and any(not torch.equal(bf16.server[k], fp32.server[k]) for k in keys)
    for k in keys:
        torch.testing.assert_close(bf16.server[k], fp32.server[k], rtol=0.1, atol=0.02)
