"""What a server checks before it trusts a client's reply, and central differential privacy.

Pure tensor functions, shared by every runtime:

- :func:`check_upload` compares a reply with the upload the server expects from that client
  (same keys, shapes consistent with the client's rank, a float/integer dtype as sent,
  finite values, valid component indices, an optional L2 bound); any problem is one
  line of text, and the server drops the reply.
- :func:`clip_update` and :func:`add_gaussian_noise` implement central DP on client
  updates (update = upload - what the client started from): each update is clipped to
  L2 norm C and the aggregate gets N(0, (sigma C / K)^2) noise, as in DP-FedAvg with the
  fixed-clipping rule Flower's ``DifferentialPrivacyServerSideFixedClipping`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, State

FLOAT_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTEGER_DTYPES = (torch.int32, torch.int64)
#: upload keys holding component indices (HAFL)
INDEX_SUFFIXES = (".hafl_index",)


def _rank_consistent(key: str, got: torch.Size, want: torch.Size, shrinkable: bool) -> bool:
    if got == want:
        return True
    if not shrinkable or len(got) != 2 or len(want) != 2:
        return False
    if key.endswith(LORA_A_SUFFIX):  # r x d_in: fewer components allowed (pruning)
        return got[1] == want[1] and 1 <= got[0] <= want[0]
    if key.endswith(LORA_B_SUFFIX):  # d_out x r
        return got[0] == want[0] and 1 <= got[1] <= want[1]
    return False


def check_upload(
    upload: Any,
    expected: Mapping[str, torch.Tensor],
    *,
    max_components: int | None = None,
    shrinkable_rank: bool = False,
    max_norm: float | None = None,
    max_abs: float | None = None,
) -> str | None:
    """None if ``upload`` is acceptable, else the reason it is not (one line).

    Never raises: anything a client can put in a reply (non-tensors, sparse or meta tensors,
    odd dtypes, non-finite or huge values) is a reason, not an exception."""
    if not isinstance(upload, Mapping) or not all(isinstance(k, str) for k in upload):
        return "tensors are not a mapping of names to tensors"
    missing = sorted(set(expected) - set(upload))
    extra = sorted(set(upload) - set(expected))
    if extra:
        return f"unexpected key {extra[0]!r}"
    if missing:
        return f"missing key {missing[0]!r}"
    for key, value in upload.items():
        want = expected[key]
        if not isinstance(value, torch.Tensor):
            return f"{key}: not a tensor ({type(value).__name__})"
        if value.layout != torch.strided or value.device.type != "cpu":
            return f"{key}: not a dense CPU tensor ({value.layout}, {value.device.type})"
        if key.endswith(INDEX_SUFFIXES):
            if value.dtype not in INTEGER_DTYPES or value.dim() != 1:
                return f"{key}: indices must be a 1-D integer tensor, got {value.dtype} {tuple(value.shape)}"
            if value.numel() != want.numel():
                return f"{key}: {value.numel()} indices, expected {want.numel()}"
            if max_components is not None and value.numel() and (int(value.min()) < 0 or int(value.max()) >= max_components):
                return f"{key}: index out of range [0, {max_components})"
            if value.unique().numel() != value.numel():
                return f"{key}: repeated indices"
            continue
        if value.dtype not in FLOAT_WIRE_DTYPES:
            return f"{key}: dtype {value.dtype} is not a float wire dtype"
        if not _rank_consistent(key, value.shape, want.shape, shrinkable_rank):
            return f"{key}: shape {tuple(value.shape)} does not fit expected {tuple(want.shape)}"
        if not torch.isfinite(value).all():
            return f"{key}: non-finite values"
        if max_abs is not None and value.numel() and float(value.abs().max()) > max_abs:
            return f"{key}: |value| {float(value.abs().max()):.4g} exceeds the bound {max_abs:.4g}"
    for key in upload:  # A and B of one module must agree on the rank
        if key.endswith(LORA_A_SUFFIX):
            b_key = key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX
            if b_key in upload and upload[key].shape[0] != upload[b_key].shape[1]:
                return f"{key}: rank {upload[key].shape[0]} differs from its B's {upload[b_key].shape[1]}"
    if max_norm is not None:
        squares = [(v.double() ** 2).sum() for v in upload.values() if v.is_floating_point()]
        norm = float(torch.sqrt(torch.stack(squares).sum())) if squares else 0.0
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def check_count(value: Any, name: str, maximum: int) -> str | None:
    """None if ``value`` is a whole number in [1, maximum] (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number, got {type(value).__name__} {value!r}"[:200]
    if not 1 <= value <= maximum:
        return f"{name}={value} is outside [1, {maximum}]"
    return None


def check_metrics(metrics: Any) -> str | None:
    """None if every reported metric is a finite real number."""
    if not isinstance(metrics, Mapping):
        return "metrics are not a mapping"
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {name!s:.40} is not a finite number ({type(value).__name__})"
    return None


def update_norm(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((upload[k].double() - reference[k].double()) ** 2).sum() for k in upload)))


def clip_update(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip: float) -> tuple[State, bool]:
    """reference + (upload - reference) * min(1, C / ||upload - reference||); and whether it clipped."""
    norm = update_norm(upload, reference)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = {k: (reference[k] + (upload[k] - reference[k]) * factor).to(upload[k].dtype) for k in upload}
    return clipped, factor < 1.0


def add_gaussian_noise(state: Mapping[str, torch.Tensor], keys: list[str], std: float, generator: torch.Generator) -> State:
    noisy = dict(state)
    for key in keys:
        noise = torch.randn(state[key].shape, generator=generator, dtype=torch.float64) * std
        noisy[key] = (state[key].double() + noise).to(state[key].dtype)
    return noisy
