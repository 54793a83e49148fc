"""Tensor dictionaries <-> Flower records. Tensors travel as ArrayRecords (numpy, no pickles).

numpy has no bfloat16, so bf16 tensors are cast to float32 before sending; the values were
already rounded to bf16 by the sender (``wire_dtype``), so the cast loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedtune.state import State


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        tensors[key] = value.float() if value.dtype == torch.bfloat16 else value.contiguous()
    return ArrayRecord(torch_state_dict=tensors)


def from_record(record: ArrayRecord) -> State:
    return {key: value.clone() for key, value in record.to_torch_state_dict().items()}
