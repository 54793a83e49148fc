"""fedtune eval: a run's base, global and personal models scored on real test rows of the
built-in evaluation suites (seed 000's commonsense and math sets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import requires_shared_data, shared_data_dir, tiny_overrides, write_classification_jsonl, write_instruction_jsonl

from fedtune.cli import main
from fedtune.data.builtin.gsm8k import final_answer
from fedtune.data.sources import load_task

SUITE = ["piqa", "social-iqa", "winogrande", "addsub", "multiarith", "singleeq", "svamp", "aqua", "mawps"]


@requires_shared_data
@pytest.mark.parametrize("name", SUITE)
def test_each_suite_task_loads_its_local_test_set(name: str) -> None:
    task = load_task(name, str(shared_data_dir()))
    assert len(task.train) == 0 and len(task.test) > 200
    row = task.test[0]
    if task.metric == "multiple_choice":
        assert len(row["choices"]) >= 2 and 0 <= row["answer"] < len(row["choices"])
    else:
        assert task.metric == "exact_match" and row["final"] != ""
        if name == "aqua":
            assert row["final"] in "ABCDE"


def test_final_answers_follow_the_expected_form() -> None:
    assert final_answer("so 30 - 15 = 15. The answer is 15.", "15") == "15"
    assert final_answer("A: the total is 4.0", "4") == "4"
    assert final_answer("A: The rationale ... The answer is (D).", "D") == "D"
    assert final_answer("Answer Choices: (A) 1 (B) 2 ... so (C)", "C") == "C"
    assert final_answer("no letter here", "B") == ""


@requires_shared_data
def test_a_training_run_on_an_evaluation_only_task_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides("piqa", model="tiny-llama", data_dir=str(shared_data_dir())), "--out", str(out)]) == 2
    assert "no training rows" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    data = write_instruction_jsonl(root / "rows.jsonl")
    out = root / "run"
    overrides = tiny_overrides(data, model="tiny-llama", method="fed-alora", rounds=1, max_new_tokens=6)
    assert main(["run", *overrides, "--out", str(out)]) == 0
    return out


@requires_shared_data
def test_eval_scores_base_global_and_personal_models_on_real_rows(generation_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    tasks = ["piqa", "arc-e", "aqua", "addsub"]
    args = ["eval", str(generation_run), "--tasks", *tasks, "--max-examples", "3", "--data-dir", str(shared_data_dir())]
    assert main(args) == 0
    printed = capsys.readouterr().out
    clients = sorted(p.name for p in (generation_run / "clients").iterdir())
    for name in tasks:
        record = json.loads((generation_run / "eval" / f"{name}.json").read_text())
        assert record["examples"] == 3 and record["source"].endswith(("piqa", "ARC-Easy", "AQuA", "AddSub"))
        assert list(record["results"]) == ["base", "global", *[f"client-{c}" for c in clients]]
        metric = record["metric"]
        assert metric == ("mc_accuracy" if name in ("piqa", "arc-e") else "exact_match")
        values = [r[metric] for r in record["results"].values()]
        assert all(any(v == pytest.approx(k / 3, abs=1e-6) for k in range(4)) for v in values)  # a share of 3 examples
        assert all(r["loss"] > 0 for r in record["results"].values())  # the language-model loss of the answers
        assert f"| {name} | {metric} | 3 |" in printed
    # the global adapter really changes the model: its answer loss differs from the base's
    piqa = json.loads((generation_run / "eval" / "piqa.json").read_text())["results"]
    assert piqa["global"]["loss"] != piqa["base"]["loss"]
    assert (generation_run / "eval" / "table.md").read_text().count("\n| ") == 1 + len(tasks)  # header + a row per task


@requires_shared_data
def test_eval_refuses_tasks_that_do_not_fit_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_classification_jsonl(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(data, rounds=1), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "piqa", "--data-dir", str(shared_data_dir())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "classification model" in err
    assert main(["eval", str(out), "--tasks", "nonsense"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (out / "eval").exists()


@requires_shared_data
def test_eval_reads_merged_weights_too(tmp_path: Path) -> None:
    """FedEx-LoRA exports merged target weights, not an adapter."""
    data = write_instruction_jsonl(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(data, model="tiny-llama", method="fedex-lora", rounds=1, lr=0.05), "--out", str(out)]) == 0
    assert (out / "merged").is_dir()
    assert main(["eval", str(out), "--tasks", "winogrande", "--max-examples", "2", "--data-dir", str(shared_data_dir())]) == 0
    results = json.loads((out / "eval" / "winogrande.json").read_text())["results"]
    assert list(results) == ["base", "global"] and results["global"]["loss"] != results["base"]["loss"]
