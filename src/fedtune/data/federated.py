"""From a config to tokenised per-client shards: load, subsample, partition, hold out, encode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets

from fedtune.data.encode import Example, encode_classification, encode_generation, encode_images, encode_scored
from fedtune.data.partition import partition
from fedtune.data.sources import FieldMap, TaskData, load_tasks
from fedtune.errors import UsageError


@dataclass
class ClientData:
    client_id: int
    train: list[Example]
    test: list[Example] = field(default_factory=list)
    scored_test: list[Example] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass
class FederatedData:
    task: TaskData
    clients: list[ClientData]
    test: list[Example]
    scored_test: list[Example]
    #: raw (untokenised) rows per client, for reports and the Flower runtime's partition ids
    client_rows: list[datasets.Dataset] = field(default_factory=list)


@dataclass
class PartitionPlan:
    """The tokenizer-free part of data preparation, done before any model is loaded so that
    bad input (missing file, more clients than rows) fails fast."""

    task: TaskData
    client_train: list[datasets.Dataset]
    client_test: list[datasets.Dataset]
    test: datasets.Dataset


def _cap(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or len(ds) <= limit:
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def field_map(config: Any) -> FieldMap:
    """The column names a run config gives for a user's own dataset."""
    return FieldMap(
        text=config.text_field,
        text_pair=config.text_pair_field,
        label=config.label_field,
        prompt=config.prompt_field,
        response=config.response_field,
        image=config.image_field,
    )


def plan_partitions(config: Any) -> PartitionPlan:
    fields = field_map(config)
    task = load_tasks(config.dataset, config.data_dir, fields, config.task, config.seed, config.test_dataset)
    if config.task != "auto" and config.task != task.kind:
        raise UsageError(f"dataset {config.dataset!r} is a {task.kind} task, not {config.task}")
    if len(task.train) == 0:
        raise UsageError(
            f"dataset {config.dataset!r} has no training rows (a test set only): score a run on it with "
            f"`fedtune eval RUN_DIR --tasks {config.dataset}`, or give it as test_dataset= beside a training set"
        )
    train = _cap(task.train, config.max_train_examples, config.seed)
    if config.partition == "natural":
        by = config.partition_by or task.natural_key or "label"
    else:
        by = config.partition_by or ("label" if task.kind == "classification" else (task.natural_key or "category"))
    shards = partition(
        train, config.partition, config.clients, by, seed=config.seed,
        alpha=config.dirichlet_alpha, classes_per_client=config.classes_per_client,
    )  # fmt: skip
    client_train, client_test = [], []
    for i, shard in enumerate(shards):
        n_test = int(len(shard) * config.local_test_fraction)
        if n_test >= 1 and len(shard) - n_test >= 1:
            parts = shard.train_test_split(test_size=n_test, seed=config.seed + i)
            client_train.append(parts["train"])
            client_test.append(_cap(parts["test"], config.max_client_eval_examples, config.seed))
        else:
            client_train.append(shard)
            client_test.append(shard.select([]))
    return PartitionPlan(task, client_train, client_test, _cap(task.test, config.max_eval_examples, config.seed))


def plan_own_data(config: Any, client_id: int, path: str) -> PartitionPlan:
    """The plan of a client that brings its own data file (a deployed data holder): its
    rows are client ``client_id``'s shard (minus a held-out local test split); the other
    clients' shards are empty here, since they live on other machines."""
    fields = field_map(config)
    task = load_tasks(path, None, fields, config.task, config.seed)
    # the file is all this holder has: its local test split comes out of every row
    train = _cap(datasets.concatenate_datasets([task.train, task.test]), config.max_train_examples, config.seed)
    n_test = int(len(train) * config.local_test_fraction)
    test = train.select([])
    if n_test >= 1 and len(train) - n_test >= 1:
        parts = train.train_test_split(test_size=n_test, seed=config.seed + client_id)
        train, test = parts["train"], _cap(parts["test"], config.max_client_eval_examples, config.seed)
    empty = train.select([])
    client_train = [train if i == client_id else empty for i in range(config.clients)]
    client_test = [test if i == client_id else empty for i in range(config.clients)]
    return PartitionPlan(task, client_train, client_test, task.test.select([]))


def _encoders(plan: PartitionPlan, tokenizer: Any, max_seq_len: int):
    """``tokenizer``: the model's tokenizer, or its image input spec for an image task."""
    task = plan.task
    scored = task.metric in ("multiple_choice", "exact_match")

    def encode(rows: datasets.Dataset) -> list[Example]:
        if len(rows) == 0:
            return []
        if task.modality == "image":
            return encode_images(rows, tokenizer)
        if task.kind == "classification":
            return encode_classification(rows, tokenizer, max_seq_len)
        return encode_generation(rows, tokenizer, max_seq_len)

    def encode_scored_rows(rows: datasets.Dataset) -> list[Example]:
        return encode_scored(rows, tokenizer, max_seq_len) if scored and len(rows) else []

    return encode, encode_scored_rows


def encode_client(plan: PartitionPlan, tokenizer: Any, max_seq_len: int, client_id: int) -> ClientData:
    """One client's tokenised shard: training rows and its own test split."""
    encode, encode_scored_rows = _encoders(plan, tokenizer, max_seq_len)
    test = plan.client_test[client_id]
    return ClientData(client_id, encode(plan.client_train[client_id]), encode(test), encode_scored_rows(test))


def encode_plan(
    plan: PartitionPlan, tokenizer: Any, max_seq_len: int, only_clients: set[int] | None = None, global_test: bool = True
) -> FederatedData:
    """Tokenise the plan. A Flower client encodes only its own shard (``only_clients``) and
    the server only the global test set; ``None`` encodes every client."""
    encode, encode_scored_rows = _encoders(plan, tokenizer, max_seq_len)
    clients = [
        encode_client(plan, tokenizer, max_seq_len, i) if only_clients is None or i in only_clients else ClientData(i, [])
        for i in range(len(plan.client_train))
    ]
    test_rows = plan.test if global_test else plan.test.select([])
    return FederatedData(plan.task, clients, encode(test_rows), encode_scored_rows(test_rows), plan.client_train)
