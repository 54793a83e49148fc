"""Reading the LoRA factors of a run directory for analysis.

A run directory (see :mod:`fedtune.rundir`) holds the global adapter in ``adapter/``, personal
adapters in ``clients/<id>/adapter/`` for methods with local parts, and the state before
round 1 in ``initial/global.safetensors`` (plus ``initial/clients/<id>.safetensors`` with
``lora.init_seed_mode=per_client``). Everything here is read into :class:`Adapter` objects
keyed by module name, so the analyses never see PEFT prefixes or file layouts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedtune.errors import UsageError
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, lora_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
GLOBAL = "global"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Adapter:
    """The LoRA factors of one adapter: module -> (A: r × d_in, B: d_out × r) and its scale s.

    ``scale[module]`` is s in ΔW = s·B·A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
    """

    label: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: dict[str, float]

    @property
    def modules(self) -> list[str]:
        return list(self.factors)


@dataclass(frozen=True)
class Run:
    """A run's adapters: the global one, the personal ones (by client id) and their initial states.

    ``initial[label]`` is the state ``adapters`` labelled ``label`` started from: the client's
    own init with per-client seeds, the shared init otherwise. It uses the same scales.
    """

    path: Path
    global_adapter: Adapter
    clients: list[Adapter]
    initial: dict[str, Adapter] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return self.global_adapter.modules

    @property
    def adapters(self) -> list[Adapter]:
        """The global adapter first, then every client's."""
        return [self.global_adapter, *self.clients]


def adapter_key_to_canonical(name: str) -> str | None:
    """A LoRA key of a saved PEFT adapter -> canonical key (``...query.lora_A``); other keys -> None.

    ``save_pretrained`` writes ``base_model.model.<module>.lora_A.weight``; in-memory state
    dicts keep the adapter name (``...lora_A.<adapter>.weight``). Both are accepted. Heads and
    other saved tensors are not analysed. (Kept here rather than in models/binding.py so that
    reading a finished run needs no model code.)
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    parts = name.split(".")
    for factor in ("lora_A", "lora_B"):
        if factor in parts[:-1] and parts[-1] == "weight":
            at = len(parts) - 1 - parts[::-1].index(factor)
            if at >= len(parts) - 3:  # <factor>.weight or <factor>.<adapter>.weight
                return ".".join(parts[:at]) + "." + factor
    return None


def _alpha_for(module: str, config: Mapping[str, Any]) -> float:
    # PEFT matches alpha_pattern keys against the end of the module name (tuners_utils.get_pattern_key).
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


def lora_scale(module: str, rank: int, config: Mapping[str, Any]) -> float:
    """s = alpha / r, or alpha / sqrt(r) with ``use_rslora`` (PEFT's LoraLayer.update_layer).

    ``rank`` is the module's own r (its A's rows), so ``rank_pattern`` is honoured as saved.
    """
    alpha = _alpha_for(module, config)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # a truncated or foreign file is the user's input, not a crash
        raise UsageError(f"{path} is not a readable safetensors file ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a readable JSON file ({type(err).__name__})") from None


def _factors(state: Mapping[str, torch.Tensor], where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = lora_modules(state)
    if not modules:
        raise UsageError(f"{where} holds no LoRA factors")
    return {m: (state[m + LORA_A_SUFFIX], state[m + LORA_B_SUFFIX]) for m in modules}


def load_adapter(directory: Path, label: str) -> Adapter:
    """A PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    weights, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise UsageError(f"{path} not found")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} does not hold an adapter config")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read_safetensors(weights).items():
        key = adapter_key_to_canonical(name)
        if key is not None:
            state[key] = tensor
    factors = _factors(state, weights)
    scale = {m: lora_scale(m, a.shape[0], config) for m, (a, _) in factors.items()}
    return Adapter(label, factors, scale)


def load_initial(path: Path, like: Adapter, label: str) -> Adapter:
    """The initial state file (canonical keys), restricted to ``like``'s modules and scales."""
    state = _read_safetensors(path)
    factors = _factors(state, path)
    missing = [m for m in like.modules if m not in factors]
    if missing:
        raise UsageError(f"{path} lacks the LoRA modules {missing[:3]} of the adapter")
    return Adapter(label, {m: factors[m] for m in like.modules}, dict(like.scale))


def _client_ids(path: Path) -> list[str]:
    root = path / "clients"
    if not root.is_dir():
        return []
    found = [d.name for d in root.iterdir() if (d / "adapter" / ADAPTER_WEIGHTS).is_file()]
    return sorted(found, key=lambda name: (0, int(name), "") if name.isdigit() else (1, 0, name))


def check_run(path: Path) -> None:
    """Fail with one clear line if ``path`` is not a run directory with a LoRA adapter."""
    if not path.is_dir():
        raise UsageError(f"run directory {path} not found")
    if (path / "adapter" / ADAPTER_WEIGHTS).is_file():
        return
    if (path / "model").is_dir():
        raise UsageError(f"{path} has no LoRA adapters (a full-weight run: model/); analyze needs adapter/")
    raise UsageError(f"{path} has no adapter/{ADAPTER_WEIGHTS}: not a finished LoRA run directory")


def load_run(path: Path | str, with_initial: bool = True) -> Run:
    """Every adapter of a run directory; with ``with_initial`` also their initial states.

    Client adapters must cover the global adapter's modules (a method never adds any).
    """
    path = Path(path)
    check_run(path)
    global_adapter = load_adapter(path / "adapter", GLOBAL)
    clients = [load_adapter(path / "clients" / cid / "adapter", cid) for cid in _client_ids(path)]
    for client in clients:
        if client.modules != global_adapter.modules:
            raise UsageError(f"{path}: client {client.label}'s adapter has other LoRA modules than the global one")
    initial: dict[str, Adapter] = {}
    if with_initial:
        shared = path / "initial" / "global.safetensors"
        if not shared.is_file():
            raise UsageError(f"{shared} not found: the run predates initial-state saving; re-run it to analyze changes")
        initial[GLOBAL] = load_initial(shared, global_adapter, f"initial:{GLOBAL}")
        for client in clients:
            own = path / "initial" / "clients" / f"{client.label}.safetensors"
            initial[client.label] = (
                load_initial(own, client, f"initial:{client.label}") if own.is_file() else initial[GLOBAL]
            )
    return Run(path, global_adapter, clients, initial)


def check_comparable(run: Run, other: Run) -> None:
    """Two runs can be compared module by module: same module names and factor shapes (up to r)."""
    if run.modules != other.modules:
        only = sorted(set(run.modules) ^ set(other.modules))
        raise UsageError(f"{run.path} and {other.path} have different LoRA modules (e.g. {only[:2] or 'their order'})")
    for module in run.modules:
        (a, b), (a2, b2) = run.global_adapter.factors[module], other.global_adapter.factors[module]
        if a.shape[1] != a2.shape[1] or b.shape[0] != b2.shape[0]:
            raise UsageError(f"{module}: layer shapes differ between {run.path} and {other.path} (another model?)")
