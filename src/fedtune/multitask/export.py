"""The exported multi-task adapter: ``adapter.safetensors`` + ``adapter_config.json``.

peft has no layer with N A's (or N B's) and a router, so the adapter is saved in fedtune's own
small format rather than forced into a PEFT folder:

``adapter.safetensors`` (float32), per adapted module ``<module>`` (its full name in the base model):

- ``<module>.lora_A``: (num_A, r, d_in), ``<module>.lora_B``: (num_B, d_out, r), where
  (num_A, num_B) = (N, 1) for ALoRA, (1, N) for HydraLoRA, (1, 1) for LoRA;
- ``<module>.router``: (N, d_in), the router W_r (only with soft routing and N > 1);
- ``heads.<i>.weight`` / ``heads.<i>.bias``: task i's classification head (classification only).

``adapter_config.json``: ``format``, ``variant``, ``base_model`` (loadable by ``fedtune.models.load_model``),
``task_kind``, ``tasks`` (in head / task-index order), ``num_labels`` per task, ``num_adapters``, ``r``,
``alpha``, ``scale`` (= alpha / r; the layer adds ``scale · Σ_i g_i B_· A_· x``), ``routing``,
``top_k``, ``target_modules`` (name suffixes) and ``modules`` (each module's ``d_in``/``d_out``).

``load_adapter(dir)`` rebuilds the base model, injects the layers and loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedtune.models.loading import load_model
from fedtune.multitask.model import AdapterSpec, MultiTaskModel
from fedtune.multitask.routing import RoutingSpec

ADAPTER_FORMAT = "fedtune-multitask-adapter/1"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_config(mt: MultiTaskModel, base_model: str, task_kind: str, tasks: list[str], num_labels: list[int]) -> dict[str, Any]:
    spec = mt.spec
    return {
        "format": ADAPTER_FORMAT,
        "variant": spec.variant,
        "base_model": base_model,
        "task_kind": task_kind,
        "tasks": tasks,
        "num_labels": num_labels,
        **spec.describe(),
        "modules": {name: {"d_in": layer.d_in, "d_out": layer.d_out} for name, layer in mt.layers.items()},
    }


def save_adapter(mt: MultiTaskModel, out_dir: Path, config: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in mt.adapter_state().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": ADAPTER_FORMAT})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(adapter_dir: Path, base_model: str | None = None) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The base model with the saved adapter (and heads) in place, in eval mode, and its config."""
    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{adapter_dir} is not a {ADAPTER_FORMAT} adapter")
    classification = config["task_kind"] == "classification"
    loaded = load_model(base_model or config["base_model"], config["task_kind"], max(config["num_labels"] or [0]))
    spec = AdapterSpec(
        config["variant"], config["num_adapters"], config["r"], config["alpha"],
        RoutingSpec(config["routing"], config["top_k"]), tuple(config["target_modules"]),
    )  # fmt: skip
    mt = MultiTaskModel(loaded, spec, config["num_labels"] if classification else None, seed=0)
    mt.load_adapter_state(load_file(str(Path(adapter_dir) / WEIGHTS_FILE)))
    mt.model.eval()
    return mt, config
