"""Tensor dictionaries <-> Flower records. Tensors travel as ArrayRecords (numpy, no pickles).

numpy has no bfloat16, so bf16 tensors are cast to float32 before sending; the values were
already rounded to bf16 by the sender (``wire_dtype``), so the cast loses nothing.

What arrives is read defensively: only numpy-serialised, native-order float32/float16/
int32/int64 arrays whose bytes match their declared shape become tensors; anything else
(an unknown stype, big-endian, strings, structured or object dtypes, garbage bytes) is a
:class:`RecordError` with a one-line reason, never an exception from numpy or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.constant import SType

from fedtune.state import State


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        tensors[key] = value.float() if value.dtype == torch.bfloat16 else value.contiguous()
    return ArrayRecord(torch_state_dict=tensors)


#: numpy dtypes a fedtune peer ever sends (bf16 travels as float32)
WIRE_NUMPY_DTYPES = {"float32", "float16", "int32", "int64"}


class RecordError(ValueError):
    """A record that cannot be read as fedtune tensors."""


def from_record(record: Any) -> State:
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord, got {type(record).__name__}")
    state: State = {}
    for key in list(record.keys()):
        array = record[key]
        if getattr(array, "stype", None) != SType.NUMPY:
            raise RecordError(f"{key!s:.60}: unsupported serialisation {getattr(array, 'stype', None)!r:.40}")
        try:
            values = array.numpy()
        except Exception as err:  # numpy's own parser on untrusted bytes
            raise RecordError(f"{key!s:.60}: unreadable array data ({type(err).__name__})") from None
        if not isinstance(values, np.ndarray) or values.dtype.name not in WIRE_NUMPY_DTYPES or values.dtype.byteorder == ">":
            raise RecordError(f"{key!s:.60}: dtype {getattr(values, 'dtype', '?')!s:.40} is not one fedtune sends")
        if list(values.shape) != list(array.shape):
            raise RecordError(f"{key!s:.60}: data of shape {values.shape} declared as {list(array.shape)[:8]}")
        state[key] = torch.from_numpy(np.ascontiguousarray(values).copy())
    return state
