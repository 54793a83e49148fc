"""End to end on real data and real models from ../shared/data (marked slow, run by make test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import requires_shared_data, shared_data_dir
from peft import PeftModel

from fedtune.cli import main
from fedtune.data.encode import collate
from fedtune.models import load_model
from fedtune.rundir import read_metrics

pytestmark = [pytest.mark.slow, requires_shared_data]


def test_minilm_20newsgroups_two_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [
        "run", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), f"data_dir={shared_data_dir()}", "rounds=2", "clients=4", "local_steps=3",
        "batch_size=8", "max_seq_len=64", "max_train_examples=400", "max_eval_examples=100",
        "max_client_eval_examples=10", "eval_every=1", "progress=false", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed and "fed-alora" in printed
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["personal_accuracy"] <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "minilm" and summary["dataset"] == "20newsgroups"
    # the adapter loads on the real base model and changes its predictions
    base = load_model("minilm", "classification", num_labels=20, seed=0).model
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        logits = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    assert logits.shape == (1, 20)
    assert not torch.allclose(logits, plain)


def test_smollm2_dolly_one_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "run", "method=fedit", "model=smollm2-135m", "dataset=dolly15k", f"data_dir={shared_data_dir()}",
        "clients=2", "partition=iid", "rounds=1", "local_steps=2", "batch_size=2", "max_seq_len=96",
        "max_train_examples=40", "max_eval_examples=8", "progress=false", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    [row] = read_metrics(out)
    assert row["perplexity"] > 1.0 and row["loss"] > 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_smollm2_arc_multiple_choice_scoring(tmp_path: Path) -> None:
    """The multiple-choice metric runs on the real LM and is a proper accuracy."""
    out = tmp_path / "run"
    args = [
        "run", "method=ffa-lora", "model=smollm2-135m", "dataset=arc-e", f"data_dir={shared_data_dir()}",
        "clients=2", "partition=iid", "rounds=1", "local_steps=1", "batch_size=2", "max_seq_len=160",
        "max_train_examples=20", "max_eval_examples=12", "progress=false", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    [row] = read_metrics(out)
    assert 0.0 <= row["mc_accuracy"] <= 1.0
    assert round(row["mc_accuracy"] * 12) == pytest.approx(row["mc_accuracy"] * 12)


def test_generation_eval_batches_match_single(tmp_path: Path) -> None:
    """Left-padded batched scoring equals one-at-a-time scoring (padding does not leak)."""
    from fedtune.data.encode import encode_generation
    from fedtune.data.sources import load_task
    from fedtune.runtime.evaluation import evaluate_language_model

    task = load_task("dolly15k", str(shared_data_dir()))
    loaded = load_model("smollm2-135m", "generation")
    examples = encode_generation(task.test.select(range(4)), loaded.tokenizer, 64)
    device = torch.device("cpu")
    together = evaluate_language_model(loaded.model, examples, 4, loaded.pad_token_id, device, "fp32")
    singles = [evaluate_language_model(loaded.model, [e], 1, loaded.pad_token_id, device, "fp32") for e in examples]
    tokens = [int((collate([e], 0).labels[:, 1:] != -100).sum()) for e in examples]
    weighted = sum(s["loss"] * t for s, t in zip(singles, tokens)) / sum(tokens)
    assert together["loss"] == pytest.approx(weighted, rel=1e-4)


@pytest.mark.parametrize(
    "extra",
    [["method=rolora"], ["method=fedsvd"], ["method=fedex-lora"], ["method=fedit", "scaffold.enabled=true"],
     ["method=fedit", "fedprox.mu=0.05"], ["method=fedsa-lora", "server_opt.name=fedadam", "server_opt.lr=0.01"]],
    ids=["rolora", "fedsvd", "fedex-lora", "scaffold", "fedprox", "fedadam"],
)  # fmt: skip
def test_newer_baselines_on_minilm_20newsgroups(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "run"
    args = [
        "run", f"data_dir={shared_data_dir()}", "model=minilm", "dataset=20newsgroups", "rounds=2", "clients=3",
        "local_steps=2", "batch_size=8", "max_seq_len=48", "max_train_examples=150", "max_eval_examples=60",
        "max_client_eval_examples=10", "lr=0.01", "precision=fp32", "progress=false", *extra, "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2] and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    base = load_model("minilm", "classification", num_labels=20, seed=0).model
    if "method=fedex-lora" in extra:  # the residual and the adapter, merged into the target weights
        from safetensors.torch import load_file

        merged = load_file(str(out / "merged" / "merged_weights.safetensors"))
        own = base.state_dict()
        assert set(merged) <= set(own) and any(k.endswith("query.weight") for k in merged)
        assert any(not torch.equal(v, own[k]) for k, v in merged.items() if k.endswith("query.weight"))
    else:
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        with torch.no_grad():
            logits = adapted(input_ids=torch.tensor([[101, 7592, 2088, 102]])).logits
        assert logits.shape == (1, 20)


def test_first_smollm2_conversion_speaks_only_fedtune_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from fedtune.models.loading import smollm2_path

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    target = smollm2_path()
    err = capfd.readouterr().err
    assert (target / "config.json").exists() and (target / "tokenizer_config.json").exists()
    assert err.startswith("fedtune: converting SmolLM2-135M-Instruct.Q4_1.gguf once")
    assert "de-quantizing" not in err and err.count("\n") == 1
