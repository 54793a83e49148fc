"""Centralised multi-task fine-tuning with multi-adapter LoRA: ALoRA vs HydraLoRA vs plain LoRA.

ALoRA (seed 000): N A matrices, one shared B, a per-token router; HydraLoRA: one shared A, N B's,
the same router; LoRA: one A, one B. One shared frozen base model, one head per task
(classification), batches drawn one task at a time. Run with ``fedtune multitask CONFIG --out DIR``.

    layers.py   the multi-adapter linear layer (all three variants)
    routing.py  soft / task-id routing, top-k, the load-balancing loss, router statistics
    model.py    injection into target modules, per-task heads, the routing context
    config.py   the typed run config
    data.py     task rows and tokens
    train.py    the run: prepare, train, evaluate, write
    export.py   the adapter file format (safetensors + JSON config) and its loader
    report.py   summary statistics, the printed table, plots
"""

from fedtune.multitask.config import MultiTaskConfig, load_multitask_config
from fedtune.multitask.layers import VARIANTS, MultiLoRALinear, expected_parameter_count, factor_counts
from fedtune.multitask.routing import RouterRecorder, RoutingContext, RoutingSpec

__all__ = [
    "VARIANTS",
    "MultiLoRALinear",
    "MultiTaskConfig",
    "RouterRecorder",
    "RoutingContext",
    "RoutingSpec",
    "expected_parameter_count",
    "factor_counts",
    "load_multitask_config",
]
