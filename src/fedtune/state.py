"""Plain tensor dictionaries: the currency between clients, server and runtimes.

Every method works on ``State = dict[str, Tensor]`` with *canonical* keys:

- ``<module>.lora_A`` (r x d_in) and ``<module>.lora_B`` (d_out x r) for a LoRA module,
- the parameter's own dotted name for anything else (a task head such as
  ``classifier.weight`` or a full base weight such as ``bert.encoder...query.weight``).

Canonical keys carry no PEFT prefixes (``base_model.model.``) or adapter names, so the
same key means the same thing in the simulator, in a Flower message and in a unit test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

State = dict[str, torch.Tensor]

LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
#: a LoRA target module's own (base) weight, for methods that merge into it (FLoRA)
BASE_SUFFIX = ".base_layer.weight"

# Roles a key can play; methods decide what to share by role.
ROLE_A = "A"
ROLE_B = "B"
ROLE_HEAD = "head"
ROLE_WEIGHT = "weight"
ROLE_BASE = "base"

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def role_of(key: str, lora: bool = True) -> str:
    """The role of a canonical key: LoRA factor A or B, a head parameter, or a full weight."""
    if key.endswith(LORA_A_SUFFIX):
        return ROLE_A
    if key.endswith(LORA_B_SUFFIX):
        return ROLE_B
    if lora and key.endswith(BASE_SUFFIX):
        return ROLE_BASE
    return ROLE_HEAD if lora else ROLE_WEIGHT


def module_of(key: str) -> str:
    """``layer.0.query.lora_A`` -> ``layer.0.query``."""
    for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"{key!r} is not a LoRA factor key")


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Modules that have both an A and a B factor in ``state``, in key order."""
    modules = [module_of(k) for k in state if k.endswith(LORA_A_SUFFIX) and not is_bookkeeping(k)]
    return [m for m in modules if m + LORA_B_SUFFIX in state]


#: server-side bookkeeping (per-client ranks, round counters): never sent, averaged or loaded
BOOKKEEPING_PREFIX = "_"


def is_bookkeeping(key: str) -> bool:
    return key.startswith(BOOKKEEPING_PREFIX)


def without_bookkeeping(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v for k, v in state.items() if not is_bookkeeping(k)}


def pad_rank(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """Zero-pad (or truncate) every LoRA factor to ``rank`` components; other keys as they are."""
    out: State = {}
    for key, value in state.items():
        if key.endswith(LORA_A_SUFFIX):
            out[key] = torch.zeros((rank, value.shape[1]), dtype=value.dtype)
            out[key][: min(rank, value.shape[0])] = value[:rank]
        elif key.endswith(LORA_B_SUFFIX):
            out[key] = torch.zeros((value.shape[0], rank), dtype=value.dtype)
            out[key][:, : min(rank, value.shape[1])] = value[:, :rank]
        else:
            out[key] = value
    return out


def scale_b(state: Mapping[str, torch.Tensor], factor: float) -> State:
    """Every LoRA B factor multiplied by ``factor`` (moving factors between rank scales); other keys as they are."""
    return {k: v * factor if k.endswith(LORA_B_SUFFIX) and not is_bookkeeping(k) else v for k, v in state.items()}


def select(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> State:
    return {k: state[k] for k in keys if k in state}


def clone(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def travels_exact(key: str, tensor: torch.Tensor) -> bool:
    """Whether ``key`` crosses the wire in its own dtype whatever ``wire_dtype`` says: integer
    tensors (indices), and merged base weights (FLoRA's W), which the server and each client
    must hold bit for bit alike and which a bf16 copy would round far more than an update."""
    return not tensor.is_floating_point() or key.endswith(BASE_SUFFIX)


def num_bytes(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Exact bytes of the tensors' data, floating tensors as sent in ``dtype`` (their own
    dtype if None); what :func:`travels_exact` always in its own dtype."""
    total = 0
    for key, tensor in state.items():
        wire = dtype if dtype is not None and not travels_exact(key, tensor) else tensor.dtype
        total += tensor.numel() * torch.empty((), dtype=wire).element_size()
    return total


def num_params(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_k w_k * state_k over the keys of the first state, in float32 or better.

    Accumulation is done in float64 so the result does not depend on client order beyond
    float rounding, then cast back to the inputs' dtype.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    result: State = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += float(weight) * state[key].detach().to(torch.float64)
        result[key] = acc.to(first.dtype)
    return result


def through_wire(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> State:
    """What the receiver holds after ``state`` was sent as ``dtype``: cast there and back.

    Rounding to bf16/fp16 is real information loss; the simulator applies it so that a
    run with ``wire_dtype=bfloat16`` measures its effect rather than just its bytes.
    Casting twice gives the same values as casting once, so a sender may round first.
    """
    return {
        k: v.detach().to(dtype).to(v.dtype) if not travels_exact(k, v) and v.dtype != dtype else v.detach().clone()
        for k, v in state.items()
    }


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise KeyError(f"key sets differ: {sorted(set(a) ^ set(b))[:5]}")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)
