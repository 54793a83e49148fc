"""Multi-task ALoRA / HydraLoRA / LoRA: layer math, parameter counts, routing, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import requires_shared_data, shared_data_dir, write_classification_jsonl
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtune.cli import main
from fedtune.multitask.layers import MultiLoRALinear, expected_parameter_count
from fedtune.multitask.routing import RoutingContext, RoutingSpec

D_IN, D_OUT, R = 12, 10, 4


def base_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT)


def with_random_b(layer: MultiLoRALinear, seed: int = 1) -> MultiLoRALinear:
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def lora_output(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, x: torch.Tensor) -> torch.Tensor:
    return base(x) + scale * x @ a.T @ b.T


def test_alora_with_one_adapter_equals_plain_lora() -> None:
    base = base_linear()
    alora = with_random_b(MultiLoRALinear(base, "alora", 1, R, alpha=8.0, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 5, D_IN)
    expected = lora_output(base, alora.lora_A[0], alora.lora_B[0], 8.0 / R, x)
    torch.testing.assert_close(alora(x), expected, rtol=1e-6, atol=1e-6)
    # and equals peft's LoRA layer with the same A and B
    model = nn.Sequential()
    model.add_module("proj", base_linear())
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8.0, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(alora.lora_A[0])
        layer.lora_B["default"].weight.copy_(alora.lora_B[0])
    torch.testing.assert_close(peft_model(x), alora(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chosen", [0, 2])
def test_alora_routed_entirely_to_one_a_equals_lora_with_that_a(chosen: int) -> None:
    base = base_linear()
    context = RoutingContext()
    alora = with_random_b(MultiLoRALinear(base, "alora", 3, R, alpha=8.0, context=context, generator=torch.Generator().manual_seed(0)))
    context.override = torch.nn.functional.one_hot(torch.tensor(chosen), 3).float()
    x = torch.randn(2, 4, D_IN)
    expected = lora_output(base, alora.lora_A[chosen], alora.lora_B[0], 8.0 / R, x)
    torch.testing.assert_close(alora(x), expected, rtol=1e-6, atol=1e-6)
    # HydraLoRA routed to B_i equals LoRA(B_i, A)
    hydra = with_random_b(MultiLoRALinear(base, "hydralora", 3, R, alpha=8.0, context=context, generator=torch.Generator().manual_seed(0)))
    expected = lora_output(base, hydra.lora_A[0], hydra.lora_B[chosen], 8.0 / R, x)
    torch.testing.assert_close(hydra(x), expected, rtol=1e-6, atol=1e-6)


def test_soft_routing_mixes_the_a_matrices_per_token() -> None:
    base = base_linear()
    alora = with_random_b(MultiLoRALinear(base, "alora", 3, R, alpha=8.0, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, D_IN)
    weights = torch.softmax(alora.router(x), dim=-1)
    mixed_a = torch.einsum("tn,nrd->trd", weights, alora.lora_A)
    expected = base(x) + (8.0 / R) * torch.einsum("or,trd,td->to", alora.lora_B[0], mixed_a, x)
    torch.testing.assert_close(alora(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "n"), [("alora", 4), ("hydralora", 4), ("alora", 2), ("hydralora", 3), ("lora", 1)])
def test_parameter_counts_match_the_formulas(variant: str, n: int) -> None:
    layer = MultiLoRALinear(base_linear(), variant, n, R, alpha=8.0)
    counted = sum(p.numel() for p in layer.adapter_parameters())
    formulas = {
        "alora": n * R * D_IN + D_OUT * R + (n * D_IN if n > 1 else 0),
        "hydralora": R * D_IN + n * D_OUT * R + (n * D_IN if n > 1 else 0),
        "lora": R * D_IN + D_OUT * R,
    }
    assert counted == formulas[variant] == expected_parameter_count(variant, n, R, D_IN, D_OUT, RoutingSpec())


def test_task_id_routing_and_top_k() -> None:
    context = RoutingContext()
    layer = MultiLoRALinear(base_linear(), "alora", 3, R, alpha=8.0, routing=RoutingSpec(mode="task_id"), context=context)
    assert layer.router is None
    context.task = 1
    weights = layer.routing_weights(torch.randn(2, 5, D_IN))
    assert torch.equal(weights, torch.tensor([0.0, 1.0, 0.0]).expand(2, 5, 3))
    top1 = MultiLoRALinear(base_linear(), "alora", 3, R, alpha=8.0, routing=RoutingSpec(top_k=1), context=RoutingContext())
    weights = top1.routing_weights(torch.randn(7, D_IN))
    assert torch.equal(weights.sum(-1), torch.ones(7)) and torch.equal((weights > 0).sum(-1), torch.ones(7, dtype=torch.long))


def check_summary(summary: dict, tasks: list[str], adapters: int) -> None:
    """Per-task scores, their mean and spread, and router weights per task summing to 1."""
    scores = summary["scores"]
    assert list(scores) == tasks and all(0.0 <= v <= 1.0 for v in scores.values())
    values = list(scores.values())
    assert summary["mean"] == pytest.approx(sum(values) / len(values))
    assert summary["spread"]["range"] == pytest.approx(max(values) - min(values))
    for task in tasks:
        weights = summary["router_weights"][task]
        assert len(weights) == adapters and sum(weights) == pytest.approx(1.0)


@pytest.fixture
def two_tasks(tmp_path: Path) -> list[str]:
    return [str(write_classification_jsonl(tmp_path / f"task{i}.jsonl", rows=40, labels=2 + i, seed=i)) for i in range(2)]


def test_multitask_command_reports_per_task_scores_and_router_weights(two_tasks: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "mt"
    args = [
        "multitask", "variant=alora", "model=tiny-bert", f"tasks=[{','.join(two_tasks)}]", "steps=6", "batch_size=4",
        "max_seq_len=32", "r=4", "progress=false", "device=cpu", "threads=1", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    check_summary(summary, two_tasks, adapters=2)
    assert (out / "adapter").is_dir() and (out / "config.yaml").exists()
    printed = capsys.readouterr().out
    assert "mean" in printed and "router" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["variant=moe"], "variant"),
        (["num_adapters=0"], "num_adapters"),
        (["tasks=[glue/nonexistent]"], "glue"),
    ],
)
def test_multitask_bad_input(two_tasks: list[str], tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    args = ["multitask", "model=tiny-bert", f"tasks=[{','.join(two_tasks)}]", "steps=2", *extra, "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and message in err


@pytest.mark.slow
@requires_shared_data
def test_minilm_on_two_glue_tasks(tmp_path: Path) -> None:
    out = tmp_path / "glue"
    args = [
        "multitask", "variant=alora", "model=minilm", "tasks=[glue/rte,glue/mrpc]", f"data_dir={shared_data_dir()}",
        "steps=20", "max_eval_examples_per_task=64", "max_seq_len=96", "progress=false", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    check_summary(json.loads((out / "summary.json").read_text()), ["glue/rte", "glue/mrpc"], adapters=2)
