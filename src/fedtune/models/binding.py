"""A loaded model with its trainable tensors addressed by canonical state keys.

The simulator loads the base model once and moves clients in and out by writing tensor
dictionaries into the bound parameters (``write``) and reading them back (``read``).
LoRA layers come from peft (``get_peft_model``). Clients of different LoRA ranks use one
peft adapter per distinct rank (a *slot*); ``activate(rank)`` switches between them, so a
rank-4 client really trains a rank-4 adapter on the one shared base model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedtune.atomic import atomic_dir
from fedtune.models.export import save_peft_adapter
from fedtune.models.loading import HEAD_MODULES, LoadedModel, TaskKind, default_targets
from fedtune.resources import lora_scale
from fedtune.state import BASE_SUFFIX, LORA_A_SUFFIX, LORA_B_SUFFIX, State, is_bookkeeping

PEFT_PREFIX = "base_model.model."


def slot_name(rank: int) -> str:
    return f"r{rank}"


def peft_to_canonical(name: str, adapter: str = "default") -> str | None:
    """``base_model.model.bert...query.lora_A.<adapter>.weight`` -> ``bert...query.lora_A``;
    ``...classifier.modules_to_save.<adapter>.weight`` -> ``classifier.weight``;
    ``...query.base_layer.weight`` -> itself without the prefix; other names -> None."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    for factor in ("lora_A", "lora_B"):
        marker = f".{factor}.{adapter}.weight"
        if name.endswith(marker):
            return name[: -len(marker)] + "." + factor
    marker = f".modules_to_save.{adapter}."
    if marker in name:
        return name.replace(marker, ".")
    if name.endswith(BASE_SUFFIX):
        return name
    return None


def init_lora_factors(shapes: Mapping[str, torch.Size], seed: int, scheme: str = "kaiming") -> State:
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
            state[key] = torch.randn(shape, generator=generator) / shape[0]
        else:
            tensor = torch.empty(shape)
            # kaiming_uniform_(a=sqrt(5)) is PEFT's (and nn.Linear's) default for lora_A.
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            state[key] = tensor
    return state


@dataclass(frozen=True)
class AdapterSpec:
    """What an exported adapter's config says (the parts that do not depend on the rank)."""

    alpha: float
    rslora: bool
    dropout: float
    target_modules: tuple[str, ...]
    task_type: str | None  # None: an image classifier (peft has no task type for it)
    base_model_name_or_path: str
    modules_to_save: tuple[str, ...] = ()


class ModelBinding:
    """The model plus, per rank slot, the canonical-key -> Parameter map of what may train."""

    def __init__(
        self,
        model: torch.nn.Module,
        slots: dict[int, dict[str, torch.nn.Parameter]],
        uses_lora: bool,
        matrix_keys: Iterable[str] = (),
        adapter: AdapterSpec | None = None,
        lora_init: str = "kaiming",
        on_activate: Callable[[int], None] | None = None,
        initialiser: Callable[[Mapping[str, torch.Size], int], State] | None = None,
    ) -> None:
        self.model = model
        self.slots = slots
        self.uses_lora = uses_lora
        self.matrix_keys = frozenset(matrix_keys)
        self.adapter = adapter
        self.lora_init = lora_init
        self._on_activate = on_activate
        self._initialiser = initialiser
        self.active_rank = max(slots)
        if on_activate is not None:
            on_activate(self.active_rank)
        # Heads (and, for full-weight methods, base weights) start from the loaded values.
        self._snapshots = {rank: {k: p.detach().clone() for k, p in params.items()} for rank, params in slots.items()}
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.slots[self.active_rank]

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.slots)

    def activate(self, rank: int) -> None:
        """Route the model through the adapter slot of ``rank``."""
        if rank not in self.slots:
            raise KeyError(f"no adapter slot of rank {rank}; slots: {self.ranks}")
        if rank != self.active_rank:
            self.active_rank = rank
            if self._on_activate is not None:
                self._on_activate(rank)

    def rank_of(self, state: Mapping[str, torch.Tensor]) -> int:
        """The slot a state belongs to, from the rank of its LoRA factors."""
        if not self.uses_lora:
            return self.active_rank
        for key, value in state.items():
            if key.endswith(LORA_A_SUFFIX):
                return int(value.shape[0])
        return self.active_rank

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Activate the slot of ``state``'s rank and write ``state`` into it."""
        self.activate(self.rank_of(state))
        self.write(state)

    def scale(self, rank: int | None = None) -> float:
        if self.adapter is None:
            return 1.0
        return lora_scale(self.adapter.alpha, rank or self.active_rank, self.adapter.rslora)

    def read(self, keys: Iterable[str] | None = None) -> State:
        chosen = self.params if keys is None else {k: self.params[k] for k in keys}
        return {k: p.detach().to("cpu", copy=True) for k, p in chosen.items()}

    @torch.no_grad()
    def write(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            if is_bookkeeping(key):
                continue  # a method's bookkeeping, not a model tensor
            try:
                target = self.params[key]
            except KeyError:
                raise KeyError(f"state key {key!r} is not a parameter of the rank-{self.active_rank} slot") from None
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value)

    def set_trainable(self, keys: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        wanted = set(keys)
        for params in self.slots.values():
            for param in params.values():
                param.requires_grad_(False)
        for key in wanted:
            self.params[key].requires_grad_(True)
        return {k: p for k, p in self.params.items() if k in wanted}

    def initial_state(self, seed: int, rank: int | None = None) -> State:
        """The trainable state of slot ``rank`` before training: loaded heads and weights,
        LoRA factors drawn from ``seed``."""
        state = {k: v.clone() for k, v in self._snapshots[rank or max(self.slots)].items()}
        if self.uses_lora:
            shapes = {k: v.shape for k, v in state.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}
            if self._initialiser is not None:
                state.update(self._initialiser({k: v.shape for k, v in state.items()}, seed))
            else:
                state.update(init_lora_factors(shapes, seed, self.lora_init))
        return state

    def to(self, device: torch.device) -> ModelBinding:
        if not getattr(self.model, "is_quantized", False):  # a quantised base was loaded on its device
            self.model.to(device)
        return self

    def export(self, state: Mapping[str, torch.Tensor], out_dir: Path, tokenizer: Any | None = None) -> None:
        """Save ``state``: a PEFT adapter (LoRA methods) or the whole model (full-weight)."""
        if self.uses_lora:
            assert self.adapter is not None
            save_peft_adapter(state, out_dir, self.adapter)
            return
        self.load(state)
        with atomic_dir(out_dir) as staging:
            self.model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)


def bind_lora(
    loaded: LoadedModel, task: TaskKind, lora: Any, ranks: Iterable[int] | None = None, bind_base: bool = False
) -> ModelBinding:
    """Inject one peft LoRA adapter per distinct rank (and trainable head copies) and bind them.

    ``bind_base`` also binds each target module's own weight (``<module>.base_layer.weight``)
    for methods that merge updates into it (FLoRA).
    """
    targets = lora.target_modules or default_targets(loaded.model_type)
    image = loaded.images is not None
    # peft has no task type for image classifiers: the head is trained as a module to save
    task_type = None if image else TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    heads = [name for name in HEAD_MODULES if hasattr(loaded.model, name)] if image else None
    distinct = sorted(set(ranks or [lora.r]))

    def config_for(rank: int) -> LoraConfig:
        return LoraConfig(
            task_type=task_type,
            r=rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            use_rslora=lora.rslora,
            modules_to_save=heads,
        )

    try:
        peft_model = get_peft_model(loaded.model, config_for(distinct[0]), adapter_name=slot_name(distinct[0]))
        for rank in distinct[1:]:
            peft_model.add_adapter(slot_name(rank), config_for(rank))
    except ValueError as err:
        raise ValueError(f"LoRA injection failed: {err}".splitlines()[0]) from None
    slots: dict[int, dict[str, torch.nn.Parameter]] = {}
    named = list(peft_model.named_parameters())
    for rank in distinct:
        params: dict[str, torch.nn.Parameter] = {}
        for name, param in named:
            key = peft_to_canonical(name, slot_name(rank))
            if key is not None and (bind_base or not key.endswith(BASE_SUFFIX)):
                params[key] = param
        slots[rank] = params
    spec = AdapterSpec(
        alpha=lora.alpha,
        rslora=lora.rslora,
        dropout=lora.dropout,
        target_modules=tuple(targets or peft_model.peft_config[slot_name(distinct[0])].target_modules),
        task_type=task_type.value if task_type is not None else None,
        base_model_name_or_path=loaded.name_or_path,
        modules_to_save=tuple(peft_model.peft_config[slot_name(distinct[0])].modules_to_save or ()),
    )
    return ModelBinding(
        peft_model,
        slots,
        True,
        adapter=spec,
        lora_init=lora.init,
        on_activate=lambda rank: peft_model.set_adapter(slot_name(rank)),
    )


def is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_MODULES


def bind_full(loaded: LoadedModel, scope: str, target_modules: list[str] | None) -> ModelBinding:
    """Bind base weights for full-weight methods: the target modules (+ head), or everything."""
    model = loaded.model
    targets = target_modules or default_targets(loaded.model_type) or []
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrix_keys = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_head(module_name) and id(module.weight) not in embedding_ids:
            matrix_keys.append(f"{module_name}.weight")
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        in_target = module_name.split(".")[-1] in targets
        if scope == "all" or in_target or is_head(name):
            params[name] = param
    if not params:
        raise ValueError(f"no parameters matched target modules {targets}")
    return ModelBinding(model, {0: params}, False, matrix_keys=[k for k in matrix_keys if k in params])
