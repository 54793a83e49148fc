"""A loaded model with its trainable tensors addressed by canonical state keys.

The simulator loads the base model once and moves clients in and out by writing tensor
dictionaries into the bound parameters (``write``) and reading them back (``read``).
LoRA layers come from peft (``get_peft_model``), so adapters export in PEFT format and
load with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedtune.models.loading import HEAD_MODULES, LoadedModel, TaskKind, default_targets
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, State

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def peft_to_canonical(name: str) -> str | None:
    """``base_model.model.bert...query.lora_A.default.weight`` -> ``bert...query.lora_A``;
    ``...classifier.modules_to_save.default.weight`` -> ``classifier.weight``; else None."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    for factor in ("lora_A", "lora_B"):
        marker = f".{factor}.{ADAPTER}.weight"
        if name.endswith(marker):
            return name[: -len(marker)] + "." + factor
    marker = f".modules_to_save.{ADAPTER}."
    if marker in name:
        return name.replace(marker, ".")
    return None


def init_lora_factors(shapes: Mapping[str, torch.Size], seed: int, scheme: str = "kaiming", rank: int = 8) -> State:
    """Fresh LoRA factors from one seed: A as PEFT initialises it, B = 0.

    PEFT draws A from the global RNG at injection time; we redraw it from a private
    generator so that "every client shares one init" (FFA-LoRA) and "every client has its
    own init seed" (the analysis experiment) are both exact and order-independent.
    """
    generator = torch.Generator().manual_seed(seed)
    state: State = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith(LORA_B_SUFFIX):
            state[key] = torch.zeros(shape)
        elif scheme == "gaussian":
            state[key] = torch.randn(shape, generator=generator) / rank
        else:
            tensor = torch.empty(shape)
            # kaiming_uniform_(a=sqrt(5)) is PEFT's (and nn.Linear's) default for lora_A.
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            state[key] = tensor
    return state


class ModelBinding:
    """The model plus the canonical-key -> Parameter map of everything a method may train."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.nn.Parameter],
        uses_lora: bool,
        matrix_keys: Iterable[str] = (),
        lora_rank: int = 0,
        lora_scale: float = 1.0,
        lora_init: str = "kaiming",
    ) -> None:
        self.model = model
        self.params = params
        self.uses_lora = uses_lora
        self.matrix_keys = frozenset(matrix_keys)
        self.lora_rank = lora_rank
        self.lora_scale = lora_scale
        self.lora_init = lora_init
        # Heads (and, for full-weight methods, base weights) start from the loaded values.
        self._snapshot = {k: p.detach().clone() for k, p in params.items()}
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def read(self, keys: Iterable[str] | None = None) -> State:
        chosen = self.params if keys is None else {k: self.params[k] for k in keys}
        return {k: p.detach().to("cpu", copy=True) for k, p in chosen.items()}

    @torch.no_grad()
    def write(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            try:
                target = self.params[key]
            except KeyError:
                raise KeyError(f"state key {key!r} is not a parameter of this model") from None
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value)

    def set_trainable(self, keys: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        wanted = set(keys)
        for key, param in self.params.items():
            param.requires_grad_(key in wanted)
        return {k: p for k, p in self.params.items() if k in wanted}

    def initial_state(self, seed: int) -> State:
        """The trainable state before any training: loaded heads/weights, LoRA from ``seed``."""
        state = {k: v.clone() for k, v in self._snapshot.items()}
        if self.uses_lora:
            shapes = {k: v.shape for k, v in state.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}
            state.update(init_lora_factors(shapes, seed, self.lora_init, self.lora_rank))
        return state

    def to(self, device: torch.device) -> ModelBinding:
        self.model.to(device)
        return self

    def export(self, state: Mapping[str, torch.Tensor], out_dir: Path, tokenizer: Any | None = None) -> None:
        """Write ``state`` into the model and save it: a PEFT adapter, or the full model."""
        self.write(state)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        if tokenizer is not None and not self.uses_lora:
            tokenizer.save_pretrained(out_dir)


def bind_lora(loaded: LoadedModel, task: TaskKind, lora: Any) -> ModelBinding:
    """Inject peft LoRA layers (and a trainable copy of the task head) and bind them."""
    targets = lora.target_modules or default_targets(loaded.model_type)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.rslora,
    )
    try:
        peft_model = get_peft_model(loaded.model, config)
    except ValueError as err:
        raise ValueError(f"LoRA injection failed: {err}".splitlines()[0]) from None
    peft_model.peft_config[ADAPTER].base_model_name_or_path = loaded.name_or_path
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in peft_model.named_parameters():
        key = peft_to_canonical(name)
        if key is not None:
            params[key] = param
    scale = lora.alpha / (math.sqrt(lora.r) if lora.rslora else lora.r)
    return ModelBinding(peft_model, params, True, lora_rank=lora.r, lora_scale=scale, lora_init=lora.init)


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_MODULES


def bind_full(loaded: LoadedModel, scope: str, target_modules: list[str] | None) -> ModelBinding:
    """Bind base weights for full-weight methods: the target modules (+ head), or everything."""
    model = loaded.model
    targets = target_modules or default_targets(loaded.model_type) or []
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrix_keys = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _is_head(module_name) and id(module.weight) not in embedding_ids:
            matrix_keys.append(f"{module_name}.weight")
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        in_target = module_name.split(".")[-1] in targets
        if scope == "all" or in_target or _is_head(name):
            params[name] = param
    if not params:
        raise ValueError(f"no parameters matched target modules {targets}")
    return ModelBinding(model, params, False, matrix_keys=[k for k in matrix_keys if k in params])

