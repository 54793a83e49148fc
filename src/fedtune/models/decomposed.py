"""The layer of heterogeneous Fed-ALoRA: a LoRA whose B is a shared base plus a low-rank client part.

    h = W0 x + s (B_base + B2 B1) M A x

A (r_k x d_in), M (d_m x r_k), B1 (r_k x d_m), B2 (d_out x r_k) belong to the client;
B_base (d_out x d_m) is shared by all clients whatever their rank, which is what lets
clients of different ranks average one matrix. peft has no such layer (its LoRA variants
change how A and B are used, not how B is built from four factors), so it is a small module
of our own; exported adapters are converted to plain PEFT LoRA factors
(B = (B_base + B2 B1) M, A) and load with ``PeftModel.from_pretrained``.

One layer holds one parameter *slot* per client rank, like peft's named adapters, so a
single model serves clients of every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from fedtune.models.binding import AdapterSpec, ModelBinding, is_head
from fedtune.models.loading import LoadedModel, TaskKind, default_targets
from fedtune.resources import lora_scale
from fedtune.state import LORA_A_SUFFIX, State

M_SUFFIX = ".alora_M"
B1_SUFFIX = ".alora_B1"
B2_SUFFIX = ".alora_B2"
B_BASE_SUFFIX = ".alora_B_base"
FACTOR_SUFFIXES = (LORA_A_SUFFIX, M_SUFFIX, B1_SUFFIX, B2_SUFFIX)


class _Slot(nn.Module):
    def __init__(self, rank: int, d_in: int, d_out: int, d_m: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, d_in))
        self.M = nn.Parameter(torch.zeros(d_m, rank))
        self.B1 = nn.Parameter(torch.zeros(rank, d_m))
        self.B2 = nn.Parameter(torch.zeros(d_out, rank))


class DecomposedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, ranks: Iterable[int], d_m: int, alpha: float, rslora: bool, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.B_base = nn.Parameter(torch.zeros(base.out_features, d_m))
        self.slots = nn.ModuleDict({str(r): _Slot(r, base.in_features, base.out_features, d_m) for r in ranks})
        self.scales = {r: lora_scale(alpha, r, rslora) for r in ranks}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = max(ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.slots[str(self.active)]
        z = F.linear(F.linear(self.dropout(x), slot.A), slot.M)  # M A x, width d_m
        update = F.linear(z, self.B_base) + F.linear(F.linear(z, slot.B1), slot.B2)
        return self.base(x) + self.scales[self.active] * update


def init_decomposed(shapes: Mapping[str, torch.Size], seed: int) -> State:
    """The reference code's init: A, M, B1 Kaiming-uniform, B2 = 0, B_base = 0."""
    generator = torch.Generator().manual_seed(seed)
    state: State = {}
    for key in sorted(shapes):
        if key.endswith((B2_SUFFIX, B_BASE_SUFFIX)):
            state[key] = torch.zeros(shapes[key])
        elif key.endswith((LORA_A_SUFFIX, M_SUFFIX, B1_SUFFIX)):
            tensor = torch.empty(shapes[key])
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            state[key] = tensor
    return state


def bind_decomposed(loaded: LoadedModel, task: TaskKind, lora: object, ranks: Iterable[int], d_m: int) -> ModelBinding:
    """Replace the target linear layers by decomposed LoRA layers and bind every slot."""
    model = loaded.model
    targets = list(getattr(lora, "target_modules", None) or default_targets(loaded.model_type) or [])
    ranks = sorted(set(ranks))
    layers: dict[str, DecomposedLoRALinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets and not is_head(name):
            parent_name, _, child = name.rpartition(".")
            layer = DecomposedLoRALinear(module, ranks, d_m, lora.alpha, lora.rslora, lora.dropout)  # type: ignore[attr-defined]
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            layers[name] = layer
    if not layers:
        raise ValueError(f"no linear layers named {targets} to adapt")
    heads = {name: p for name, p in model.named_parameters() if is_head(name)}
    slots: dict[int, dict[str, nn.Parameter]] = {}
    for rank in ranks:
        params: dict[str, nn.Parameter] = {}
        for name, layer in layers.items():
            slot = layer.slots[str(rank)]
            params[name + LORA_A_SUFFIX] = slot.A
            params[name + M_SUFFIX] = slot.M
            params[name + B1_SUFFIX] = slot.B1
            params[name + B2_SUFFIX] = slot.B2
            params[name + B_BASE_SUFFIX] = layer.B_base
        params.update(heads)
        slots[rank] = params

    def activate(rank: int) -> None:
        for layer in layers.values():
            layer.active = rank

    head_modules = tuple(sorted({name.split(".")[0] for name in heads}))
    spec = AdapterSpec(
        alpha=lora.alpha,  # type: ignore[attr-defined]
        rslora=lora.rslora,  # type: ignore[attr-defined]
        dropout=lora.dropout,  # type: ignore[attr-defined]
        target_modules=tuple(targets),
        task_type=None if loaded.images is not None else "SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        base_model_name_or_path=loaded.name_or_path,
        modules_to_save=head_modules,
    )
    return ModelBinding(model, slots, True, adapter=spec, on_activate=activate, initialiser=init_decomposed)
