"""Multiple-choice tasks in the LLM-Adapters prompt format, scored by answer log-likelihood."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, generation_rows, read_json_or_jsonl, register

_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def _mc_row(r: dict[str, Any], category: str) -> dict[str, Any]:
    options = _FORMAT.search(r["instruction"].strip())
    labels = options.group(1).split("/") if options else ["true", "false"]
    choices = [f"the correct answer is {label}" for label in labels]
    return {
        "prompt": r["instruction"],
        "response": f"the correct answer is {r['answer']}",
        "category": category,
        "choices": choices,
        "answer": labels.index(r["answer"]),
    }


@dataclass(frozen=True)
class MultipleChoiceTask:
    folder: str
    hub_id: str
    hub_config: str | None


MC_TASKS: dict[str, MultipleChoiceTask] = {
    "boolq": MultipleChoiceTask("boolq", "google/boolq", None),
    "arc-e": MultipleChoiceTask("ARC-Easy", "allenai/ai2_arc", "ARC-Easy"),
    "arc-c": MultipleChoiceTask("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": MultipleChoiceTask("openbookqa", "allenai/openbookqa", "main"),
    # seed 000's commonsense suite: test sets only in the local copy (evaluation tasks)
    "piqa": MultipleChoiceTask("piqa", "ybisk/piqa", None),
    "social-iqa": MultipleChoiceTask("social_i_qa", "allenai/social_i_qa", None),
    "winogrande": MultipleChoiceTask("winogrande", "allenai/winogrande", "winogrande_xl"),
}


def _mc_local(name: str) -> Callable[[Path], TaskData]:
    def load(root: Path) -> TaskData:
        folder = root / "llm_adapters" / "dataset" / MC_TASKS[name].folder
        # PIQA, Social IQa and WinoGrande come as test sets only: evaluation tasks here
        train = [_mc_row(r, name) for r in read_json_or_jsonl(folder / "train.json")] if (folder / "train.json").exists() else []
        test = [_mc_row(r, name) for r in read_json_or_jsonl(folder / "test.json")]
        return TaskData(
            name, "generation", "multiple_choice", generation_rows(train), generation_rows(test),
            natural_key="category", source=str(folder),
        )  # fmt: skip

    return load


def _mc_from_hub_record(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """Hub records rewritten into the LLM-Adapters instruction format used by the local files."""
    if name == "piqa":
        instruction = (
            f"Please choose the correct solution to the question: {r['goal']}\n\nSolution1: {r['sol1']}\n\n"
            f"Solution2: {r['sol2']}\n\nAnswer format: solution1/solution2"
        )
        return _mc_row({"instruction": instruction, "answer": f"solution{int(r['label']) + 1}"}, name)
    if name == "social-iqa":
        instruction = (
            f"Please choose the correct answer to the question: {r['context']} {r['question']}\n\n"
            f"Answer1: {r['answerA']} Answer2: {r['answerB']} Answer3: {r['answerC']}\n\nAnswer format: answer1/answer2/answer3"
        )
        return _mc_row({"instruction": instruction, "answer": f"answer{int(r['label'])}"}, name)
    if name == "winogrande":
        instruction = (
            f"Please choose the correct answer to fill in the blank to complete the given sentence: {r['sentence']}"
            f"\n\nOption1: {r['option1']} Option2: {r['option2']} Answer format: option1/option2"
        )
        return _mc_row({"instruction": instruction, "answer": f"option{int(r['answer'])}"}, name)
    if name == "boolq":
        question = r["question"].rstrip("?")
        instruction = (
            f"Please answer the following question with true or false, question: {question}?"
            "\n\nAnswer format: true/false"
        )
        return _mc_row({"instruction": instruction, "answer": "true" if r["answer"] else "false"}, name)
    question = r["question"] if "question" in r else r["question_stem"]
    texts, keys = r["choices"]["text"], r["choices"]["label"]
    options = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(texts))
    labels = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {labels}"
    )
    return _mc_row({"instruction": instruction, "answer": f"answer{keys.index(r['answerKey']) + 1}"}, name)


def _mc_hub(name: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        spec = MC_TASKS[name]
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config) if spec.hub_config else datasets.load_dataset(spec.hub_id)
        # the Hub's test labels of these are hidden: their validation split is the test set
        test_split = "validation" if name in ("boolq", "piqa", "social-iqa", "winogrande") else "test"
        parts = {
            split: generation_rows([_mc_from_hub_record(name, r) for r in ds[split]]) for split in ("train", test_split)
        }
        return TaskData(
            name, "generation", "multiple_choice", parts["train"], parts[test_split],
            natural_key="category", source=f"hub:{spec.hub_id}",
        )  # fmt: skip

    return load


for _name, _spec in MC_TASKS.items():
    register(
        _name,
        BuiltinDataset(
            f"{_spec.folder} multiple choice (LLM-Adapters format); accuracy by answer log-likelihood",
            _mc_local(_name), _mc_hub(_name), (f"llm_adapters/dataset/{_spec.folder}/test.json",),
        ),
    )  # fmt: skip
