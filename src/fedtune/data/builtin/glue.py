"""GLUE classification tasks (local TSVs, or nyu-mll/glue on the Hub); the test split is the dev split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, classification_rows, read_tsv, register
from fedtune.errors import UsageError


@dataclass(frozen=True)
class GlueTask:
    folder: str
    hub_config: str
    label_names: tuple[str, ...]
    text_fields: tuple[str, ...]  # hub column names


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "cola", ("unacceptable", "acceptable"), ("sentence",)),
    "sst2": GlueTask("SST-2", "sst2", ("negative", "positive"), ("sentence",)),
    "mrpc": GlueTask("MRPC", "mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2")),
    "rte": GlueTask("RTE", "rte", ("entailment", "not_entailment"), ("sentence1", "sentence2")),
    "qnli": GlueTask("QNLI", "qnli", ("entailment", "not_entailment"), ("question", "sentence")),
    "wnli": GlueTask("WNLI", "wnli", ("not_entailment", "entailment"), ("sentence1", "sentence2")),
}


def _glue_rows(task: str, path: Path) -> list[dict[str, Any]]:
    spec = GLUE_TASKS[task]
    if task == "cola":  # no header: source, label, original label, sentence
        return [{"text": r[3], "label": int(r[1])} for r in read_tsv(path, header=False)]
    rows = read_tsv(path, header=True)
    if task == "sst2":
        return [{"text": r[0], "label": int(r[1])} for r in rows]
    if task == "mrpc":  # Quality, #1 ID, #2 ID, #1 String, #2 String
        return [{"text": r[3], "text_pair": r[4], "label": int(r[0])} for r in rows]
    # rte, qnli, wnli: index, first, second, label (names for rte/qnli, 0/1 for wnli)
    names = list(spec.label_names)
    return [
        {"text": r[1], "text_pair": r[2], "label": int(r[3]) if r[3].isdigit() else names.index(r[3])}
        for r in rows
    ]


def _glue_local(task: str) -> Callable[[Path], TaskData]:
    def load(root: Path) -> TaskData:
        folder = root / "glue" / GLUE_TASKS[task].folder
        train_file = folder / "train.tsv"
        if not train_file.exists():
            raise UsageError(f"glue/{task}: {train_file} is missing (this copy has no training split)")
        return TaskData(
            f"glue/{task}", "classification", "accuracy",
            classification_rows(_glue_rows(task, train_file)), classification_rows(_glue_rows(task, folder / "dev.tsv")),
            label_names=list(GLUE_TASKS[task].label_names), natural_key="label", source=str(folder),
        )  # fmt: skip

    return load


def _glue_hub(task: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        spec = GLUE_TASKS[task]
        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config)

        def rows(split: str) -> list[dict[str, Any]]:
            out = []
            for r in ds[split]:
                pair = r[spec.text_fields[1]] if len(spec.text_fields) > 1 else None
                out.append({"text": r[spec.text_fields[0]], "text_pair": pair, "label": r["label"]})
            return out

        return TaskData(
            f"glue/{task}", "classification", "accuracy",
            classification_rows(rows("train")), classification_rows(rows("validation")),
            label_names=list(spec.label_names), natural_key="label", source=f"hub:nyu-mll/glue/{spec.hub_config}",
        )  # fmt: skip

    return load


for _task, _spec in GLUE_TASKS.items():
    register(
        f"glue/{_task}",
        BuiltinDataset(
            f"GLUE {_spec.folder} classification ({'/'.join(_spec.label_names)}); test = dev split",
            _glue_local(_task), _glue_hub(_task), (f"glue/{_spec.folder}/dev.tsv",),
        ),
    )  # fmt: skip
