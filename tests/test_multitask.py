"""Multi-task ALoRA / HydraLoRA / LoRA: layer math, parameter counts, routing, export, the command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import requires_shared_data, shared_data_dir, write_classification_jsonl, write_instruction_jsonl
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtune.cli import main
from fedtune.models.loading import load_model
from fedtune.multitask.config import load_multitask_config
from fedtune.multitask.export import adapter_config, load_adapter, save_adapter
from fedtune.multitask.layers import MultiLoRALinear, expected_parameter_count
from fedtune.multitask.model import AdapterSpec, MultiTaskModel
from fedtune.multitask.routing import RouterRecorder, RoutingContext, RoutingSpec, keep_top_k, switch_balance_loss

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


# -- whole models: injection, parameter counts, export -------------------------------------------

TINY = {"tiny-bert": ("classification", ("query", "value")), "tiny-llama": ("generation", ("q_proj", "v_proj"))}


def tiny_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded row
    return ids, mask


def randomise_b(mt: MultiTaskModel, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mt.layers.values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


@pytest.mark.parametrize("name", list(TINY))
def test_injected_single_adapter_model_equals_peft_lora_model(name: str) -> None:
    kind, targets = TINY[name]
    ours = MultiTaskModel(load_model(name, kind, num_labels=2), AdapterSpec("alora", 1, R, 8.0, RoutingSpec(), targets), None, seed=0)
    randomise_b(ours)
    peft_model = get_peft_model(load_model(name, kind, num_labels=2).model, LoraConfig(r=R, lora_alpha=8.0, target_modules=list(targets)))
    with torch.no_grad():
        for module_name, layer in ours.layers.items():
            peft_layer = peft_model.base_model.model.get_submodule(module_name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0])
    ours.model.eval()
    peft_model.eval()
    ids, mask = tiny_inputs()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours.model(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["alora", "hydralora"])
def test_every_layer_of_a_model_matches_the_parameter_formula(variant: str) -> None:
    # tiny-llama's v_proj is 16 x 32 (one key-value head), so d_in != d_out is covered too
    n = 3
    mt = MultiTaskModel(load_model("tiny-llama", "generation"), AdapterSpec(variant, n, R, 8.0, RoutingSpec(), ("q_proj", "v_proj")), None, seed=0)
    shapes = set()
    for layer in mt.layers.values():
        d_in, d_out = layer.d_in, layer.d_out
        shapes.add((d_out, d_in))
        per_layer = {
            "alora": n * R * d_in + d_out * R + n * d_in,
            "hydralora": R * d_in + n * d_out * R + n * d_in,
        }[variant]
        assert sum(p.numel() for p in layer.adapter_parameters()) == per_layer
    assert shapes == {(32, 32), (16, 32)}
    assert mt.parameter_counts()["adapters"] == sum(sum(p.numel() for p in l.adapter_parameters()) for l in mt.layers.values())


@pytest.mark.parametrize("variant", ["alora", "hydralora"])
def test_task_id_routing_selects_the_tasks_adapter(variant: str) -> None:
    base = base_linear()
    context = RoutingContext()
    layer = with_random_b(MultiLoRALinear(base, variant, 3, R, 8.0, RoutingSpec(mode="task_id"), context, torch.Generator().manual_seed(0)))
    x = torch.randn(2, 4, D_IN)
    for task in range(3):
        context.task = task
        a, b = (layer.lora_A[task], layer.lora_B[0]) if variant == "alora" else (layer.lora_A[0], layer.lora_B[task])
        torch.testing.assert_close(layer(x), lora_output(base, a, b, 8.0 / R, x), rtol=1e-6, atol=1e-6)
        assert torch.equal(layer.last_weights, torch.nn.functional.one_hot(torch.tensor(task), 3).float().expand(2, 4, 3))


def test_top_k_keeps_the_largest_weights_renormalised() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    kept, selected = keep_top_k(probs, 2)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]]))
    assert selected.tolist() == [[False, True, False, True]]


def test_balance_loss_is_one_when_uniform_and_n_when_collapsed() -> None:
    n = 4
    uniform = torch.full((6, n), 1.0 / n)
    spread_choice = torch.nn.functional.one_hot(torch.arange(6) % n, n).bool()
    assert float(switch_balance_loss(uniform, spread_choice, 1, None)) == pytest.approx(1.0)
    collapsed = torch.nn.functional.one_hot(torch.zeros(6, dtype=torch.long), n).float()
    assert float(switch_balance_loss(collapsed, collapsed.bool(), 1, None)) == pytest.approx(n)
    # padding tokens do not count: only the first 3 (collapsed) tokens are real
    mixed = torch.cat([collapsed[:3], uniform[:3]])
    mask = torch.tensor([True, True, True, False, False, False])
    assert float(switch_balance_loss(mixed, mixed.argmax(-1, keepdim=True) == torch.arange(n), 1, mask)) == pytest.approx(n)


def test_balance_loss_reaches_the_router_in_training() -> None:
    context = RoutingContext()
    layer = MultiLoRALinear(base_linear(), "alora", 3, R, 8.0, RoutingSpec(balance_loss=0.1), context, torch.Generator().manual_seed(0))
    layer.train()
    layer(torch.randn(2, 5, D_IN))
    assert len(context.balance_terms) == 1
    context.balance_terms[0].backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_router_recorder_averages_over_real_tokens_only() -> None:
    recorder = RouterRecorder(num_tasks=2, num_adapters=2)
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (batch 1, seq 3, N 2)
    recorder.add(1, weights, torch.tensor([[True, True, False]]))
    recorder.add(1, weights, torch.tensor([[True, True, False]]))  # a second layer, same tokens
    means = recorder.means()
    assert means[1].tolist() == [0.5, 0.5] and torch.isnan(means[0]).all()


def test_exported_adapter_reloads_to_the_same_outputs(tmp_path: Path) -> None:
    spec = AdapterSpec("hydralora", 2, R, 8.0, RoutingSpec(), ("query", "value"))
    mt = MultiTaskModel(load_model("tiny-bert", "classification", num_labels=3), spec, [2, 3], seed=0)
    randomise_b(mt)
    mt.model.eval()
    save_adapter(mt, tmp_path / "adapter", adapter_config(mt, "tiny-bert", "classification", ["a", "b"], [2, 3]))
    reloaded, config = load_adapter(tmp_path / "adapter")
    assert config["variant"] == "hydralora" and config["scale"] == pytest.approx(2.0)
    ids, mask = tiny_inputs()
    for task, labels in enumerate([2, 3]):
        mt.use_task(task)
        reloaded.use_task(task)
        ours = mt.model(input_ids=ids, attention_mask=mask).logits
        assert ours.shape == (2, labels)
        torch.testing.assert_close(reloaded.model(input_ids=ids, attention_mask=mask).logits, ours, rtol=0, atol=0)


# -- the command: generation tasks, determinism, more bad input ----------------------------------


def tiny_args(tasks: list[str], out: Path, *extra: str) -> list[str]:
    return [
        "multitask", "model=tiny-bert", f"tasks=[{','.join(tasks)}]", "steps=6", "batch_size=4", "max_seq_len=32",
        "r=4", "progress=false", "device=cpu", "threads=1", *extra, "--out", str(out),
    ]  # fmt: skip


def test_generation_tasks_by_category_report_per_category_loss(tmp_path: Path) -> None:
    data = write_instruction_jsonl(tmp_path / "gen.jsonl", rows=80)
    out = tmp_path / "gen"
    args = [
        "multitask", "variant=hydralora", "model=tiny-llama", f"dataset={data}", "task_by=category", "steps=4",
        "batch_size=4", "max_seq_len=48", "r=4", "progress=false", "device=cpu", "threads=1", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == ["c0", "c1"] and summary["score_metric"] == "loss" and not summary["higher_is_better"]
    for task in ("c0", "c1"):
        assert summary["per_task"][task]["perplexity"] > 1.0
        assert sum(summary["router_weights"][task]) == pytest.approx(1.0)
    assert summary["num_adapters"] == 2 and summary["params"]["heads"] == 0


def test_same_seed_same_run(two_tasks: list[str], tmp_path: Path) -> None:
    runs = []
    for name in ("one", "two"):
        assert main(tiny_args(two_tasks, tmp_path / name, "variant=alora", "eval_every=3")) == 0
        runs.append(tmp_path / name)
    first, second = (json.loads((run / "summary.json").read_text()) for run in runs)
    assert first["per_task"] == second["per_task"] and first["router_weights"] == second["router_weights"]
    tensors = [(run / "adapter" / "adapter.safetensors").read_bytes() for run in runs]
    assert tensors[0] == tensors[1]
    metrics = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [3, 6]
    assert {p.name for p in (runs[0] / "plots").iterdir()} >= {"task_scores.png", "router_weights.png"}


def test_task_id_routing_and_balance_loss_run_end_to_end(two_tasks: list[str], tmp_path: Path) -> None:
    assert main(tiny_args(two_tasks, tmp_path / "tid", "variant=alora", "routing=task_id")) == 0
    router = json.loads((tmp_path / "tid" / "summary.json").read_text())["router_weights"]
    assert router == {two_tasks[0]: [1.0, 0.0], two_tasks[1]: [0.0, 1.0]}
    assert main(tiny_args(two_tasks, tmp_path / "bal", "variant=hydralora", "balance_loss=0.01", "top_k=1")) == 0
    row = json.loads((tmp_path / "bal" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["balance_loss"] >= 1.0 - 1e-6  # N · Σ f_i P_i >= 1 with top-1 dispatch


MORE_BAD_INPUT = {
    "unknown task name": (["tasks=[no_such_task]"], "no_such_task"),
    "task_id with N != tasks": (["routing=task_id", "num_adapters=3"], "routing=task_id needs num_adapters = number of tasks"),
    "top_k above N": (["top_k=3"], "top_k=3 exceeds num_adapters=2"),
    "lora with several adapters": (["variant=lora", "num_adapters=3"], "variant lora has one adapter"),
    "no tasks": (["tasks=null"], "name the tasks"),
    "unknown setting": (["rank=4"], "rank: unknown setting"),
}


@pytest.mark.parametrize("case", MORE_BAD_INPUT, ids=list(MORE_BAD_INPUT))
def test_more_bad_input_is_one_line_and_exit_2(case: str, two_tasks: list[str], tmp_path: Path, capsys) -> None:
    extra, message = MORE_BAD_INPUT[case]
    out = tmp_path / "x"
    assert main(tiny_args(two_tasks, out, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists(), "a failed start must not leave a run directory"


def test_unknown_category_of_a_split_dataset(tmp_path: Path, capsys) -> None:
    data = write_instruction_jsonl(tmp_path / "gen.jsonl", rows=40)
    args = ["multitask", "model=tiny-llama", f"dataset={data}", "tasks=[c0,c9]", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown task 'c9'" in err and err.strip().count("\n") == 0


def test_glue_configs_give_every_variant_the_same_adapter_budget() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "multitask"
    budgets = {}
    for variant in ("alora", "hydralora", "lora"):
        config = load_multitask_config(root / f"glue-minilm-{variant}.yaml")
        n = config.adapters_for(len(config.tasks))
        budgets[variant] = expected_parameter_count(variant, n, config.r, 384, 384, config.routing_spec)
        assert config.alpha / config.r == pytest.approx(2.0)
    assert budgets == {"alora": 16896, "hydralora": 16896, "lora": 16896}


def _write_choice_jsonl(path: Path, rows: int, seed: int) -> Path:
    """A user's multiple-choice rows: prompt, candidate answers, the gold one's index."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            choices = [str(a + b), str(a + b + 1), str(abs(a - b))]
            answer = rng.randrange(3)
            choices[0], choices[answer] = choices[answer], choices[0]
            f.write(json.dumps({"prompt": f"{a} plus {b}?", "response": choices[answer], "choices": choices, "answer": answer}) + "\n")
    return path


@torch.no_grad()
def _hand_mc_accuracy(model: nn.Module, scored: list) -> float:
    """The share of rows whose gold candidate has the largest summed token log-probability after
    the prompt, one sequence at a time."""
    correct = 0
    for example in scored:
        scores = []
        for choice in example.choices or []:
            seq = torch.cat([example.input_ids, choice])
            logprobs = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), dim=-1)
            positions = torch.arange(len(example.input_ids) - 1, len(seq) - 1)
            scores.append(float(logprobs[positions, choice].sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == example.answer)
    return correct / len(scored)


def test_multiple_choice_tasks_are_scored_by_answer_log_likelihood(tmp_path: Path) -> None:
    """Each task's mc_accuracy is the share of its test rows whose gold candidate has the largest
    summed token log-probability after the prompt, recomputed here one sequence at a time."""
    from fedtune.multitask.config import MultiTaskConfig
    from fedtune.multitask.data import load_task_rows
    from fedtune.multitask.train import evaluate_tasks, prepare, train

    tasks = [str(_write_choice_jsonl(tmp_path / f"mc{i}.jsonl", rows=30, seed=i)) for i in range(2)]
    config = MultiTaskConfig(variant="alora", model="tiny-llama", tasks=tasks, steps=3, batch_size=4, max_seq_len=48, r=4,
                             progress=False, device="cpu", threads=1)  # fmt: skip
    rows = load_task_rows(config)
    assert rows.metric == "multiple_choice"
    job = prepare(config, rows)
    assert (job.score_metric, job.higher_is_better) == ("mc_accuracy", True)
    train(job)
    metrics, _ = evaluate_tasks(job)
    job.mt.model.eval()
    for index, task in enumerate(job.tasks):
        job.mt.use_task(index)
        assert task.scored and len(task.scored) == len(task.test)
        assert metrics[task.name]["mc_accuracy"] == pytest.approx(_hand_mc_accuracy(job.mt.model, task.scored))
        assert metrics[task.name]["loss"] > 0  # the response loss is still reported beside it


def test_a_tasks_floor_is_the_most_frequent_training_label_on_its_test_rows() -> None:
    import datasets

    from fedtune.multitask.data import TaskRows, majority_floor

    train = datasets.Dataset.from_dict({"label": [2, 2, 1, 0, 2, 1]})  # 2 is the most frequent
    test = datasets.Dataset.from_dict({"label": [2, 1, 1, 2, 0, 1, 1, 2]})  # three of eight are 2
    assert majority_floor(TaskRows("t", train, test, 3), "label") == 3 / 8
    answers = TaskRows("mc", datasets.Dataset.from_dict({"answer": [0, 3, 3]}), datasets.Dataset.from_dict({"answer": [3, 1]}), 0)
    assert majority_floor(answers, "answer") == 1 / 2


@pytest.mark.parametrize("variant", ["alora", "hydralora"])
def test_eval_initial_scores_the_untouched_base_model_before_step_one(variant: str, tmp_path: Path) -> None:
    """With eval_initial, the first row (step 0) is the base model's score: recomputed here with a
    freshly loaded model that never had adapters, one sequence at a time; the summary keeps it."""
    from fedtune.multitask.config import MultiTaskConfig
    from fedtune.multitask.data import load_task_rows
    from fedtune.multitask.train import build_summary, prepare, train

    tasks = [str(_write_choice_jsonl(tmp_path / f"mc{i}.jsonl", rows=30, seed=i)) for i in range(2)]
    config = MultiTaskConfig(variant=variant, model="tiny-llama", tasks=tasks, steps=4, batch_size=4, max_seq_len=48, r=4, lr=0.05,
                             eval_initial=True, seed=3, progress=False, device="cpu", threads=1)  # fmt: skip
    job = prepare(config, load_task_rows(config))
    rows, timings = train(job)
    assert [row["step"] for row in rows] == [0, 4]
    assert rows[0]["train_loss"] is None and rows[1]["train_loss"] is not None
    base = load_model("tiny-llama", "generation", seed=3).model.eval()
    for task in job.tasks:
        assert rows[0]["scores"][task.name] == pytest.approx(_hand_mc_accuracy(base, task.scored))
    # the untrained losses differ from the trained ones: step 0 really was before training
    assert any(rows[0]["tasks"][t]["loss"] != rows[1]["tasks"][t]["loss"] for t in job.names)
    summary = build_summary(job, rows, timings, wall=1.0)
    assert summary["initial_scores"] == rows[0]["scores"]
    assert summary["scores"] == rows[1]["scores"]
