"""The tasks of a multi-task run: their rows (loaded first, to validate input cheaply) and tokens.

Caps are applied after a seeded shuffle, so ``max_train_examples_per_task=2000`` keeps a random
2000 rows of SST-2, not its first 2000. Evaluation uses each task's test split (GLUE: the dev
split; Dolly: the held-out ``global_test.json`` rows of the category). Multiple-choice tasks
(BoolQ, ARC, OpenBookQA: generation rows with candidate answers) train on the gold answer's
tokens and are scored by answer log-likelihood, as ``fedtune run`` scores them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import datasets

from fedtune.data.encode import Example, encode_classification, encode_generation, encode_scored
from fedtune.data.sources import Kind, Metric, TaskData, load_task
from fedtune.errors import UsageError
from fedtune.multitask.config import MultiTaskConfig


@dataclass
class TaskRows:
    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    #: classification: the task's own number of labels (its head's width); generation: 0
    num_labels: int


@dataclass
class TaskRowSet:
    kind: Kind
    tasks: list[TaskRows]
    #: what each task is scored by: ``accuracy`` (classification), ``perplexity`` (the response
    #: loss) or ``multiple_choice``; one for all tasks, so that their scores average
    metric: Metric = "accuracy"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


@dataclass
class EncodedTask:
    name: str
    train: list[Example]
    test: list[Example]
    num_labels: int
    #: multiple choice: the test rows as prompts with candidate answers
    scored: list[Example] = field(default_factory=list)
    #: accuracy of always giving the most frequent training label (answer position for multiple
    #: choice) on the test rows: the score a task has not been learned at; None for loss-scored tasks
    majority_floor: float | None = None


def _cap(rows: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or len(rows) <= limit:
        return rows
    return rows.shuffle(seed=seed).select(range(limit))


def _rows_by_value(rows: datasets.Dataset, column: str, value: str) -> datasets.Dataset:
    values = rows[column]
    return rows.select([i for i, v in enumerate(values) if v == value])


Parts = list[tuple[str, datasets.Dataset, datasets.Dataset, int]]


def _split_dataset(config: MultiTaskConfig) -> tuple[Kind, Metric, Parts]:
    """``dataset`` + ``task_by``: one task per value of the column."""
    assert config.dataset is not None
    data = load_task(config.dataset, config.data_dir, seed=config.seed)
    column = config.task_by
    if column not in data.train.column_names:
        raise UsageError(f"task_by={column!r} is not a column of {config.dataset}; columns: {data.train.column_names}")
    known = sorted(set(data.train[column]))
    chosen = config.tasks or known
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}: not a {column} of {config.dataset}; known: {', '.join(known)}")
    parts = []
    for name in chosen:
        test = _rows_by_value(data.test, column, name) if column in data.test.column_names else data.test.select([])
        parts.append((name, _rows_by_value(data.train, column, name), test, data.num_labels))
    return data.kind, data.metric, parts


def _task_list(config: MultiTaskConfig) -> tuple[Kind, Metric, Parts]:
    """``tasks``: one dataset per task, all of one kind."""
    assert config.tasks is not None
    loaded: list[TaskData] = [load_task(name, config.data_dir, seed=config.seed) for name in config.tasks]
    kinds = {d.kind for d in loaded}
    if len(kinds) > 1:
        raise UsageError(f"tasks mix classification and generation datasets: {config.tasks}")
    metrics = {d.metric if d.metric == "multiple_choice" else "other" for d in loaded}
    if len(metrics) > 1:  # a log-likelihood accuracy and a loss do not average
        raise UsageError(f"tasks mix multiple-choice and other generation datasets: {config.tasks}")
    return kinds.pop(), loaded[0].metric, [(name, d.train, d.test, d.num_labels) for name, d in zip(config.tasks, loaded)]


def load_task_rows(config: MultiTaskConfig) -> TaskRowSet:
    """Every task's capped rows; raises UsageError on any input problem, before a model loads."""
    kind, metric, parts = _split_dataset(config) if config.dataset is not None else _task_list(config)
    try:
        config.check_task_count(len(parts))
    except ValueError as err:
        raise UsageError(f"invalid config: {err}") from None
    tasks = []
    for name, train, test, num_labels in parts:
        if len(train) == 0 or len(test) == 0:
            raise UsageError(f"task {name!r} has {len(train)} training and {len(test)} test rows; it needs both")
        if kind == "classification" and num_labels < 2:  # no label names: count the ids seen
            num_labels = max(max(train["label"]), max(test["label"])) + 1
        tasks.append(
            TaskRows(
                name,
                _cap(train, config.max_train_examples_per_task, config.seed),
                _cap(test, config.max_eval_examples_per_task, config.seed),
                num_labels if kind == "classification" else 0,
            )
        )
    if kind == "generation" and metric != "multiple_choice":
        metric = "perplexity"  # Dolly's categories (and other generation rows, math too) are scored by their response loss
    return TaskRowSet(kind, tasks, "accuracy" if kind == "classification" else metric)


def encode_tasks(rows: TaskRowSet, tokenizer: object, max_len: int) -> list[EncodedTask]:
    encode = encode_classification if rows.kind == "classification" else encode_generation
    scored = rows.metric == "multiple_choice"
    return [
        EncodedTask(
            t.name,
            encode(t.train, tokenizer, max_len),
            encode(t.test, tokenizer, max_len),
            t.num_labels,
            encode_scored(t.test, tokenizer, max_len) if scored else [],
            majority_floor(t, "answer" if scored else "label") if scored or rows.kind == "classification" else None,
        )
        for t in rows.tasks
    ]


def majority_floor(task: TaskRows, column: str) -> float:
    """The share of test rows whose ``column`` is the training rows' most frequent value."""
    most = Counter(task.train[column]).most_common(1)[0][0]
    return sum(v == most for v in task.test[column]) / len(task.test)
