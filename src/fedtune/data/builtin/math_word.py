"""Seed 000's math suite beside GSM8K: AddSub, MultiArith, SingleEq, SVAMP, AQuA, MAWPS.

The local copies (LLM-Adapters' ``dataset/<name>/test.json``) are test sets: these are
evaluation tasks (``fedtune eval``, or ``test_dataset=`` beside a training set). Each is scored
like GSM8K, by exact match of the final answer of a greedy generation: a number (normalised:
"15.0" and "15" match), or for AQuA the option letter A-E.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.builtin.gsm8k import final_number
from fedtune.data.sources import BuiltinDataset, TaskData, generation_rows, read_json_or_jsonl, register

#: name: (local folder, Hub id or None, Hub split)
MATH_TASKS: dict[str, tuple[str, str | None, str]] = {
    "addsub": ("AddSub", None, "test"),
    "multiarith": ("MultiArith", None, "test"),
    "singleeq": ("SingleEq", None, "test"),
    "svamp": ("SVAMP", "ChilleD/SVAMP", "test"),
    "aqua": ("AQuA", "deepmind/aqua_rat", "test"),
    "mawps": ("mawps", None, "test"),
}


def _final(answer: Any) -> str:
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in "ABCDE":
        return text.upper()
    return final_number(text)


def _rows(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        final = _final(r["answer"])
        response = (r.get("output") or "").strip() or f"The answer is {final}."
        rows.append({"prompt": r["instruction"].strip(), "response": response, "category": name, "final": final})
    return rows


def _local(name: str) -> Callable[[Path], TaskData]:
    def load(root: Path) -> TaskData:
        folder = root / "llm_adapters" / "dataset" / MATH_TASKS[name][0]
        test = generation_rows(_rows(read_json_or_jsonl(folder / "test.json"), name))
        return TaskData(name, "generation", "exact_match", generation_rows([]), test, natural_key="category", source=str(folder))

    return load


def _hub_record(name: str, r: dict[str, Any]) -> dict[str, Any]:
    if name == "svamp":
        return {"instruction": f"{r['Body']} {r['Question']}", "output": "", "answer": r["Answer"]}
    # aqua_rat: question, options ["A)...", ...], rationale, correct
    options = " ".join(f"({o[0]}) {o[2:]}" for o in r["options"])
    return {"instruction": f"{r['question']} Answer Choices: {options}", "output": r["rationale"], "answer": r["correct"]}


def _hub(name: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        folder, hub_id, split = MATH_TASKS[name]
        if hub_id is None:
            raise FileNotFoundError(f"{name} has no Hub source; it needs the LLM-Adapters copy (dataset/{folder}/test.json)")
        ds = datasets.load_dataset(hub_id)
        test = generation_rows(_rows([_hub_record(name, r) for r in ds[split]], name))
        return TaskData(name, "generation", "exact_match", generation_rows([]), test, natural_key="category", source=f"hub:{hub_id}")

    return load


for _name, (_folder, _hub_id, _split) in MATH_TASKS.items():
    register(
        _name,
        BuiltinDataset(
            f"{_folder} math word problems (test set); exact match on the final answer",
            _local(_name), _hub(_name), (f"llm_adapters/dataset/{_folder}/test.json",),
        ),
    )  # fmt: skip
