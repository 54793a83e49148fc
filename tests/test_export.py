"""Exported adapters load with PeftModel.from_pretrained and reproduce fedtune's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny
from peft import PeftModel

from fedtune.data.encode import collate
from fedtune.models import load_model


@pytest.mark.parametrize(
    ("model", "dataset_fixture", "method"),
    [("tiny-bert", "cls_file", "fedit"), ("tiny-llama", "gen_file", "fed-alora")],
)
def test_exported_adapter_gives_same_logits(
    model: str, dataset_fixture: str, method: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dataset = request.getfixturevalue(dataset_fixture)
    out = tmp_path / "run"
    sim, _ = run_tiny(tiny_overrides(dataset, model=model, method=method, partition="iid"), out)
    fed = sim.fed
    batch = collate(fed.data.test[:4], fed.pad_id)

    fed.binding.write(sim.global_state())
    with torch.no_grad():
        ours = fed.binding.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    task = fed.data.task
    base = load_model(model, task.kind, task.num_labels, seed=fed.config.seed).model
    loaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and the adapter is not a no-op: the base model alone gives other logits
    with torch.no_grad(), loaded.disable_adapter():
        plain = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(plain, ours, atol=1e-6)


def test_personal_adapters_load_and_differ(cls_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sim, _ = run_tiny(tiny_overrides(cls_file, method="fedsa-lora"), out)
    fed = sim.fed
    batch = collate(fed.data.test[:4], fed.pad_id)
    logits = []
    for client in (0, 1):
        base = load_model("tiny-bert", "classification", fed.data.task.num_labels, seed=fed.config.seed).model
        peft_model = PeftModel.from_pretrained(base, out / "clients" / str(client) / "adapter").eval()
        with torch.no_grad():
            logits.append(peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        fed.binding.write(sim.personal_state(client))
        with torch.no_grad():
            ours = fed.binding.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(logits[-1], ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])
