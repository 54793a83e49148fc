"""Write a LoRA state as a PEFT adapter folder, loadable with ``PeftModel.from_pretrained``.

We write the two files PEFT reads (``adapter_config.json`` via peft's own ``LoraConfig`` and
``adapter_model.safetensors`` with PEFT's key names) straight from a tensor dictionary,
instead of round-tripping through a live peft model. That way any state a method produces
(a rank-4 client's adapter, a decomposed Fed-ALoRA adapter turned into plain factors) exports
the same way, without a peft model of that exact shape in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from fedtune.atomic import atomic_dir, save_safetensors
from fedtune.state import BASE_SUFFIX, LORA_A_SUFFIX, LORA_B_SUFFIX, is_bookkeeping, lora_modules

if TYPE_CHECKING:
    from fedtune.models.binding import AdapterSpec

PEFT_PREFIX = "base_model.model."


def peft_key(canonical: str) -> str:
    """``m.lora_A`` -> ``base_model.model.m.lora_A.weight``; ``classifier.weight`` -> prefixed."""
    if canonical.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
        return PEFT_PREFIX + canonical + ".weight"
    return PEFT_PREFIX + canonical


def save_peft_adapter(state: Mapping[str, torch.Tensor], out_dir: Path, spec: AdapterSpec) -> None:
    modules = lora_modules(state)
    if not modules:
        raise ValueError("no LoRA factors to export")
    ranks = {state[m + LORA_A_SUFFIX].shape[0] for m in modules}
    if len(ranks) != 1:
        raise ValueError(f"an adapter has one rank; this state mixes ranks {sorted(ranks)}")
    config = LoraConfig(
        task_type=spec.task_type,
        r=ranks.pop(),
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        use_rslora=spec.rslora,
        modules_to_save=list(spec.modules_to_save) or None,
        base_model_name_or_path=spec.base_model_name_or_path,
        inference_mode=True,
    )
    tensors = {
        peft_key(k): v.detach().cpu().contiguous()
        for k, v in state.items()
        if not k.endswith(BASE_SUFFIX) and not is_bookkeeping(k)
    }
    with atomic_dir(out_dir) as staging:  # config and weights appear together, or not at all
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_merged_weights(state: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Target-module weights (with merged updates) and the head, under the base model's own
    parameter names: ``model.load_state_dict(load_file(path), strict=False)`` applies them."""
    tensors = {}
    for key, value in state.items():
        if is_bookkeeping(key) or key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
            continue
        name = key[: -len(BASE_SUFFIX)] + ".weight" if key.endswith(BASE_SUFFIX) else key
        tensors[name] = value.detach().cpu().contiguous()
    path = out_dir / "merged_weights.safetensors"
    save_safetensors(path, tensors, {"format": "pt"})
    return path
