"""GSM8K grade-school math, scored by exact match of the final number."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, generation_rows, read_json_or_jsonl, register

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str:
    """The final numeric answer of a solution: after '####' if present, else the last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return ""
    value = numbers[-1 if "####" not in text else 0].replace(",", "").rstrip(".")
    try:
        as_float = float(value)
    except ValueError:
        return value
    return str(int(as_float)) if as_float.is_integer() else str(as_float)


_OPTION = (re.compile(r"answer is\s*\(?([A-E])\b"), re.compile(r"\(([A-E])\)"), re.compile(r"\b([A-E])\b"))


def final_answer(text: str, expected: str) -> str:
    """The final answer of a generation in the form of ``expected``: an option letter A-E
    (AQuA: "the answer is (D)", else the last "(D)", else the last standalone letter) or a
    number (:func:`final_number`)."""
    if len(expected) == 1 and expected in "ABCDE":
        for pattern in _OPTION:
            found = pattern.findall(text)
            if found:
                return found[-1]
        return ""
    return final_number(text)


def _gsm8k_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"prompt": r["question"], "response": r["answer"], "category": "math", "final": final_number(r["answer"])}
        for r in records
    ]


def _gsm8k_local(root: Path) -> TaskData:
    folder = root / "gsm8k"
    return TaskData(
        "gsm8k", "generation", "exact_match",
        generation_rows(_gsm8k_rows(read_json_or_jsonl(folder / "train.jsonl"))),
        generation_rows(_gsm8k_rows(read_json_or_jsonl(folder / "test.jsonl"))),
        natural_key="category", source=str(folder),
    )  # fmt: skip


def _gsm8k_hub() -> TaskData:
    ds = datasets.load_dataset("openai/gsm8k", "main")
    return TaskData(
        "gsm8k", "generation", "exact_match",
        generation_rows(_gsm8k_rows(list(ds["train"]))), generation_rows(_gsm8k_rows(list(ds["test"]))),
        natural_key="category", source="hub:openai/gsm8k",
    )  # fmt: skip


register(
    "gsm8k",
    BuiltinDataset("GSM8K grade-school math; exact match on the final number", _gsm8k_local, _gsm8k_hub, ("gsm8k/train.jsonl",)),
)
