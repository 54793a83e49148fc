"""Multiple-choice tasks in the LLM-Adapters prompt format, scored by answer log-likelihood.

Each task comes in two forms:

- ``arc-e`` etc.: LLM-Adapters' (and seed 000's) protocol. The options are listed in the prompt and
  the candidates are the labels ("the correct answer is answer2"): the model must learn the label
  mapping, which a small model does not do from a few hundred steps (SmolLM2-135M scores 19 % on
  200 ARC-Easy test rows this way, below the 25 % of guessing).
- ``arc-e-text`` etc.: the question alone, each option's own text as the candidate (the way
  lm-evaluation-harness scores ARC or PIQA). The same SmolLM2 scores 41.5 % on those rows before any
  training, so training is measured from above chance.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, generation_rows, read_json_or_jsonl, register
from fedtune.errors import UsageError

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


#: "<lead>: <question>\n\n<Answer1: ... Answer2: ...>\n\nAnswer format: answer1/answer2/..."
_LAYOUT = re.compile(
    r"^Please choose the correct (?:answer|solution) to the question: (?P<question>.*?)\n\n"
    r"(?P<options>(?:Answer|Solution)1: .*)\n\nAnswer format: (?P<labels>\S+)\s*$",
    re.S,
)
_OPTION = re.compile(r"(?:Answer|Solution)(\d+): (.*?)(?=\s+(?:Answer|Solution)\d+: |$)", re.S)
TEXT_PROMPT = "Answer the question.\nQuestion: {question}"


def _text_row(r: dict[str, Any], category: str, row_number: int) -> dict[str, Any]:
    """The answer-text form of one LLM-Adapters row: the question, and each option's text as a candidate."""
    layout = _LAYOUT.match(r["instruction"].strip())
    options = _OPTION.findall(layout.group("options")) if layout else []
    labels = layout.group("labels").split("/") if layout else []
    if not layout or [int(n) for n, _ in options] != list(range(1, len(labels) + 1)):
        raise UsageError(f"{category}: row {row_number}: the options could not be read from its instruction (answer-text form)")
    choices = [text.strip() for _, text in options]
    answer = labels.index(r["answer"])
    return {
        "prompt": TEXT_PROMPT.format(question=layout.group("question").strip()),
        "response": choices[answer],
        "category": category,
        "choices": choices,
        "answer": answer,
    }


def _row(r: dict[str, Any], category: str, row_number: int, answer_texts: bool) -> dict[str, Any]:
    return _text_row(r, category, row_number) if answer_texts else _mc_row(r, category)


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


#: the tasks whose options are texts to score on their own (BoolQ's are true/false, WinoGrande's fill a blank)
TEXT_TASKS = ("arc-e", "arc-c", "openbookqa", "piqa", "social-iqa")


def _form_name(name: str, answer_texts: bool) -> str:
    return f"{name}-text" if answer_texts else name


def _mc_local(name: str, answer_texts: bool = False) -> Callable[[Path], TaskData]:
    label = _form_name(name, answer_texts)

    def load(root: Path) -> TaskData:
        folder = root / "llm_adapters" / "dataset" / MC_TASKS[name].folder

        def rows(file: str) -> list[dict[str, Any]]:
            return [_row(r, label, n + 1, answer_texts) for n, r in enumerate(read_json_or_jsonl(folder / file))]

        # PIQA, Social IQa and WinoGrande come as test sets only: evaluation tasks here
        train = rows("train.json") if (folder / "train.json").exists() else []
        test = rows("test.json")
        return TaskData(
            label, "generation", "multiple_choice", generation_rows(train), generation_rows(test),
            natural_key="category", source=str(folder),
        )  # fmt: skip

    return load


def _llm_adapters_record(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """A Hub record rewritten into the LLM-Adapters instruction format used by the local files."""
    if name == "piqa":
        instruction = (
            f"Please choose the correct solution to the question: {r['goal']}\n\nSolution1: {r['sol1']}\n\n"
            f"Solution2: {r['sol2']}\n\nAnswer format: solution1/solution2"
        )
        return {"instruction": instruction, "answer": f"solution{int(r['label']) + 1}"}
    if name == "social-iqa":
        instruction = (
            f"Please choose the correct answer to the question: {r['context']} {r['question']}\n\n"
            f"Answer1: {r['answerA']} Answer2: {r['answerB']} Answer3: {r['answerC']}\n\nAnswer format: answer1/answer2/answer3"
        )
        return {"instruction": instruction, "answer": f"answer{int(r['label'])}"}
    if name == "winogrande":
        instruction = (
            f"Please choose the correct answer to fill in the blank to complete the given sentence: {r['sentence']}"
            f"\n\nOption1: {r['option1']} Option2: {r['option2']} Answer format: option1/option2"
        )
        return {"instruction": instruction, "answer": f"option{int(r['answer'])}"}
    if name == "boolq":
        question = r["question"].rstrip("?")
        instruction = (
            f"Please answer the following question with true or false, question: {question}?"
            "\n\nAnswer format: true/false"
        )
        return {"instruction": instruction, "answer": "true" if r["answer"] else "false"}
    question = r["question"] if "question" in r else r["question_stem"]
    texts, keys = r["choices"]["text"], r["choices"]["label"]
    options = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(texts))
    labels = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {labels}"
    )
    return {"instruction": instruction, "answer": f"answer{keys.index(r['answerKey']) + 1}"}


def _mc_hub(name: str, answer_texts: bool = False) -> Callable[[], TaskData]:
    label = _form_name(name, answer_texts)

    def load() -> TaskData:
        spec = MC_TASKS[name]
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config) if spec.hub_config else datasets.load_dataset(spec.hub_id)
        # the Hub's test labels of these are hidden: their validation split is the test set
        test_split = "validation" if name in ("boolq", "piqa", "social-iqa", "winogrande") else "test"
        # one path for both forms: the Hub record is written in the local files' format first
        parts = {
            split: generation_rows([_row(_llm_adapters_record(name, r), label, n + 1, answer_texts) for n, r in enumerate(ds[split])])
            for split in ("train", test_split)
        }
        return TaskData(
            label, "generation", "multiple_choice", parts["train"], parts[test_split],
            natural_key="category", source=f"hub:{spec.hub_id}",
        )  # fmt: skip

    return load


for _name, _spec in MC_TASKS.items():
    register(
        _name,
        BuiltinDataset(
            f"{_spec.folder} multiple choice (LLM-Adapters format: the answer's label is scored); accuracy by answer log-likelihood",
            _mc_local(_name), _mc_hub(_name), (f"llm_adapters/dataset/{_spec.folder}/test.json",),
        ),
    )  # fmt: skip
for _name in TEXT_TASKS:
    _spec = MC_TASKS[_name]
    register(
        _form_name(_name, answer_texts=True),
        BuiltinDataset(
            f"{_spec.folder} multiple choice, each option's text scored after the question alone; accuracy by answer log-likelihood",
            _mc_local(_name, answer_texts=True), _mc_hub(_name, answer_texts=True), (f"llm_adapters/dataset/{_spec.folder}/test.json",),
        ),
    )  # fmt: skip
