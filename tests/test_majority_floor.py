"""The majority-class floors a run records: what answering each set's most frequent training
class scores, checked against counts written out by hand."""

from __future__ import annotations

import datasets
import torch

from fedtune.data.encode import Example
from fedtune.data.federated import ClientData, FederatedData
from fedtune.data.sources import TaskData
from fedtune.runtime.engine import majority_class_floors


def _examples(labels: list[int]) -> list[Example]:
    return [Example(torch.tensor([1, 2]), label) for label in labels]


def _data(kind: str, clients: list[ClientData], test: list[Example]) -> FederatedData:
    empty = datasets.Dataset.from_dict({"text": [], "label": []})
    task = TaskData("t", kind, "accuracy" if kind == "classification" else "loss", empty, empty, ["a", "b", "c"])
    return FederatedData(task, clients, test, [])


def test_floors_from_hand_counts() -> None:
    clients = [
        ClientData(0, _examples([0, 0, 0, 1]), _examples([0, 1, 1])),  # majority 0: 1 of 3 test rows
        ClientData(1, _examples([2, 2, 1]), _examples([2, 2, 2, 0])),  # majority 2: 3 of 4
        ClientData(2, _examples([1, 1, 1, 1, 1]), []),  # no test split: not in the personal mean
    ]
    # pooled training labels: 0 x3, 1 x7, 2 x2 -> class 1; global test has 2 of 5 rows of class 1
    floors = majority_class_floors(_data("classification", clients, _examples([1, 1, 0, 2, 2])))
    assert floors == {"majority_class_accuracy": 2 / 5, "personal_majority_class_accuracy": (1 / 3 + 3 / 4) / 2}


def test_no_floor_for_generation_or_without_test_sets() -> None:
    assert majority_class_floors(_data("generation", [ClientData(0, _examples([0]), _examples([0]))], _examples([0]))) == {}
    only_train = majority_class_floors(_data("classification", [ClientData(0, _examples([0, 1, 1]))], []))
    assert only_train == {}
