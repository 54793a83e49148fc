"""Task data: sources (local dir, file, Hub), partitioning, tokenisation."""

from fedtune.data import builtin  # noqa: F401  (registers the built-in datasets)
from fedtune.data.encode import Batch, Example, collate
from fedtune.data.federated import ClientData, FederatedData, encode_plan, plan_partitions
from fedtune.data.sources import BUILTINS, TaskData, load_task

__all__ = [
    "BUILTINS",
    "Batch",
    "ClientData",
    "Example",
    "FederatedData",
    "TaskData",
    "collate",
    "encode_plan",
    "load_task",
    "plan_partitions",
]
