"""Split a task's training rows across clients with flwr-datasets' partitioners."""

from __future__ import annotations

import contextlib
import io
from typing import Literal

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner

from fedtune.errors import UsageError

Scheme = Literal["iid", "dirichlet", "pathological", "natural"]
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")


def _make_partitioner(
    scheme: str, num_clients: int, by: str, seed: int, alpha: float, classes_per_client: int, min_size: int
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by=by, alpha=alpha, min_partition_size=min_size, seed=seed
        )
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients, partition_by=by, num_classes_per_partition=classes_per_client, seed=seed
        )
    if scheme == "natural":
        return NaturalIdPartitioner(partition_by=by)
    raise UsageError(f"unknown partition {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")


def partition(
    train: datasets.Dataset,
    scheme: str,
    num_clients: int,
    by: str,
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_size: int = 2,
) -> list[datasets.Dataset]:
    """``num_clients`` datasets, one per client, that together hold ``train``'s rows."""
    if num_clients > len(train):
        raise UsageError(f"clients={num_clients} but the training set has only {len(train)} examples")
    if scheme != "iid" and by not in train.column_names:
        raise UsageError(f"cannot partition by {by!r}: columns are {train.column_names}")
    if scheme == "natural":
        groups = len(set(list(train[by])))
        if groups != num_clients:
            raise UsageError(f"partition=natural by {by!r} gives {groups} clients; set clients={groups}")
    if scheme == "pathological" and classes_per_client > len(set(list(train[by]))):
        raise UsageError(f"classes_per_client={classes_per_client} exceeds the {len(set(list(train[by])))} values of {by!r}")
    partitioner = _make_partitioner(scheme, num_clients, by, seed, alpha, classes_per_client, min_size)
    partitioner.dataset = train
    # NaturalIdPartitioner draws a tqdm bar of its own that no argument turns off; a run prints only fedtune's words
    quiet = contextlib.redirect_stderr(io.StringIO()) if scheme == "natural" else contextlib.nullcontext()
    try:
        with quiet:
            shards = [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        raise UsageError(f"partition={scheme} failed for {num_clients} clients: {err}".splitlines()[0]) from None
    empty = [i for i, shard in enumerate(shards) if len(shard) == 0]
    if empty:
        raise UsageError(f"partition={scheme} left client(s) {empty[:5]} without data; use fewer clients or another partition")
    return shards
