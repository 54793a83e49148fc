"""A frozen base model with multi-adapter layers injected, and one classification head per task.

:class:`MultiTaskModel` owns the pieces around the Hugging Face model, which itself stays the object
you call (``model(input_ids=..., attention_mask=...)``), so fedtune's evaluation functions run on it
unchanged. Before a forward, ``use_task(t)`` says which task the batch belongs to; a forward
pre-hook copies the ``attention_mask`` into the routing context, so the layers know the real tokens
(for the balance loss and the router reports) without any change to the transformer's code.

Classification: the model's own head (``classifier`` / ``score``) is replaced by :class:`TaskHeads`,
one linear head per task with that task's number of labels, chosen by the current task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedtune.errors import UsageError
from fedtune.models.loading import HEAD_MODULES, LoadedModel, default_targets
from fedtune.multitask.layers import MultiLoRALinear, Variant
from fedtune.multitask.routing import RouterRecorder, RoutingContext, RoutingSpec

#: how far apart the seeds of adapters and heads are drawn (one run seed fixes both)
HEAD_SEED_OFFSET = 0x4EAD


@dataclass(frozen=True)
class AdapterSpec:
    """Everything that fixes the adapters' shapes and behaviour (also their export config)."""

    variant: Variant
    num_adapters: int
    r: int
    alpha: float
    routing: RoutingSpec
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def describe(self) -> dict[str, Any]:
        """The shape-and-routing fields written to both the export config and the run summary."""
        return {
            "num_adapters": self.num_adapters,
            "r": self.r,
            "alpha": self.alpha,
            "scale": self.scale,
            "routing": self.routing.mode,
            "top_k": self.routing.top_k,
            "target_modules": list(self.target_modules),
        }


class TaskHeads(nn.Module):
    """One linear head per task; the routing context's current task picks which one runs."""

    def __init__(self, in_features: int, label_counts: Sequence[int], context: RoutingContext, generator: torch.Generator, std: float) -> None:
        super().__init__()
        self.context = context
        self.heads = nn.ModuleList(nn.Linear(in_features, n) for n in label_counts)
        with torch.no_grad():
            for head in self.heads:  # the BERT classifier's init: N(0, initializer_range), bias 0
                head.weight.normal_(0.0, std, generator=generator)
                head.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.context.task is None:
            raise RuntimeError("TaskHeads needs the batch's task: call MultiTaskModel.use_task first")
        return self.heads[self.context.task](features)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def inject_adapters(model: nn.Module, spec: AdapterSpec, context: RoutingContext, seed: int) -> dict[str, MultiLoRALinear]:
    """Wrap every ``nn.Linear`` whose last name part is a target; layers are initialised in name order."""
    names = sorted(
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in spec.target_modules and isinstance(module, nn.Linear)
    )
    if not names:
        raise UsageError(f"no linear layer named {list(spec.target_modules)} in the model")
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, MultiLoRALinear] = {}
    for name in names:
        layer = MultiLoRALinear(
            model.get_submodule(name), spec.variant, spec.num_adapters, spec.r, spec.alpha, spec.routing, context, generator
        )
        _replace(model, name, layer)
        layers[name] = layer
    return layers


def _head_name(model: nn.Module) -> str:
    for name in HEAD_MODULES:
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise UsageError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_MODULES)}")


class MultiTaskModel:
    """The base model (frozen), its injected adapters, the task heads and the shared routing context."""

    def __init__(self, loaded: LoadedModel, spec: AdapterSpec, label_counts: Sequence[int] | None, seed: int) -> None:
        self.loaded = loaded
        self.model: nn.Module = loaded.model
        self.spec = spec
        self.context = RoutingContext()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = inject_adapters(self.model, spec, self.context, seed)
        self.heads: TaskHeads | None = None
        if label_counts is not None:
            head_name = _head_name(self.model)
            old = getattr(self.model, head_name)
            generator = torch.Generator().manual_seed(seed + HEAD_SEED_OFFSET)
            std = float(getattr(self.model.config, "initializer_range", 0.02))
            self.heads = TaskHeads(old.in_features, label_counts, self.context, generator, std).to(old.weight.device)
            setattr(self.model, head_name, self.heads)
        self.model.register_forward_pre_hook(self._capture_token_mask, with_kwargs=True)

    def _capture_token_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.context.token_mask = mask.bool() if mask is not None else None
        self.context.balance_terms.clear()

    def use_task(self, task: int) -> None:
        self.context.task = task

    def take_balance_loss(self) -> torch.Tensor | None:
        """The mean over layers of this forward's balance terms (None when there are none)."""
        terms = self.context.balance_terms
        if not terms:
            return None
        loss = torch.stack(terms).mean()
        terms.clear()
        return loss

    def record_routing(self, num_tasks: int) -> RouterRecorder:
        """Start collecting routing weights per task (until ``stop_recording``)."""
        self.context.recorder = RouterRecorder(num_tasks, self.spec.num_adapters)
        return self.context.recorder

    def stop_recording(self) -> None:
        self.context.recorder = None

    @contextlib.contextmanager
    def recording_paused(self) -> Iterator[None]:
        """Forward passes inside this block leave the routing record alone."""
        recorder, self.context.recorder = self.context.recorder, None
        try:
            yield
        finally:
            self.context.recorder = recorder

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for layer in self.layers.values() for p in layer.adapter_parameters()]
        if self.heads is not None:
            params += list(self.heads.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by kind (router included in ``adapters``, listed again alone)."""
        router = sum(layer.router.weight.numel() for layer in self.layers.values() if layer.router is not None)
        factors = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers.values())
        heads = sum(p.numel() for p in self.heads.parameters()) if self.heads is not None else 0
        return {"adapters": factors + router, "router": router, "heads": heads, "trainable": factors + router + heads}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name (the export format's keys)."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            state[f"{name}.lora_A"] = layer.lora_A.detach()
            state[f"{name}.lora_B"] = layer.lora_B.detach()
            if layer.router is not None:
                state[f"{name}.router"] = layer.router.weight.detach()
        if self.heads is not None:
            for i, head in enumerate(self.heads.heads):
                state[f"heads.{i}.weight"] = head.weight.detach()
                state[f"heads.{i}.bias"] = head.bias.detach()
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state()
        if set(own) != set(state):
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, tensor in own.items():
            if tensor.shape != state[key].shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not match {tuple(tensor.shape)}")
            tensor.copy_(state[key])


def resolve_targets(loaded: LoadedModel, configured: Sequence[str] | None) -> tuple[str, ...]:
    if configured:
        return tuple(configured)
    targets = default_targets(loaded.model_type)
    if targets is None:
        raise UsageError(f"no default target modules for model type {loaded.model_type!r}; set target_modules=[...]")
    return tuple(targets)
