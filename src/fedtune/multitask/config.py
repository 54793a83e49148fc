"""The multi-task run configuration: one typed schema that YAML files and ``key=value`` fill.

Two ways to name the tasks:

- ``tasks: [glue/sst2, glue/mrpc, ...]``: each a dataset (any name ``fedtune run`` accepts);
  all classification (one head per task, accuracy) or all generation (perplexity).
- ``dataset: dolly15k`` with ``task_by: category``: one dataset split into tasks by a column's
  values; ``tasks`` then optionally lists which values to keep (default: all of them).

Validated once here (``load_multitask_config``); checks that need the data (a task_by value that
does not exist, N = number of tasks for ``routing=task_id`` when the tasks come from a column) run
when the data is loaded, still before any model or run directory exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedtune.config import ConfigSection, dump_config, load_validated
from fedtune.multitask.layers import Variant
from fedtune.multitask.routing import RoutingMode, RoutingSpec


class MultiTaskConfig(ConfigSection):

    variant: Variant = "alora"
    model: str = "minilm"
    tasks: list[str] | None = Field(None, description="dataset names, or task_by values when dataset is set")
    dataset: str | None = Field(None, description="one dataset split into tasks by task_by")
    task_by: str = Field("category", description="column whose values are the tasks (with dataset)")
    data_dir: str | None = None

    num_adapters: int | None = Field(None, gt=0, description="N; default: the number of tasks (lora: 1)")
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, description="scale s = alpha / r")
    target_modules: list[str] | None = Field(None, description="default per architecture (query, value / q_proj, v_proj)")
    routing: RoutingMode = "soft"
    top_k: int | None = Field(None, gt=0, description="soft routing: keep the k largest weights, renormalised")
    balance_loss: float = Field(0.0, ge=0, description="coefficient of the Switch load-balancing loss")

    #: which task each training batch comes from: proportional to its (capped) training rows
    #: (what concatenating and shuffling the tasks gives in expectation) or uniform
    task_sampling: Literal["proportional", "uniform"] = "proportional"
    steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    max_seq_len: int = Field(128, gt=8)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_train_examples_per_task: int | None = Field(2000, gt=0)
    max_eval_examples_per_task: int | None = Field(500, gt=0)
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (default: at the end only)")
    #: every variant starts with its B's at zero, so step 0 is the base model: the floor training is measured from
    eval_initial: bool = Field(False, description="also score the model before step 1 (the base model)")

    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int | None = Field(None, gt=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> MultiTaskConfig:
        if self.dataset is None and not self.tasks:
            raise ValueError("name the tasks: tasks=[glue/sst2,glue/rte,...] or dataset=dolly15k task_by=category")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks are listed twice: {self.tasks}")
        if self.variant == "lora":
            if self.num_adapters not in (None, 1):
                raise ValueError(f"variant lora has one adapter; num_adapters={self.num_adapters} needs alora or hydralora")
            if self.routing != "soft" or self.top_k is not None or self.balance_loss > 0:
                raise ValueError("variant lora has no routing: routing, top_k and balance_loss do not apply")
        if self.routing == "task_id" and (self.top_k is not None or self.balance_loss > 0):
            raise ValueError("routing=task_id has no router: top_k and balance_loss apply to routing=soft only")
        if self.tasks and self.dataset is None:
            self.check_task_count(len(self.tasks))
        return self

    def adapters_for(self, num_tasks: int) -> int:
        """N for ``num_tasks`` tasks."""
        if self.variant == "lora":
            return 1
        return self.num_adapters or num_tasks

    def check_task_count(self, num_tasks: int) -> None:
        """The checks that need the number of tasks (ValueError: the caller reports it)."""
        n = self.adapters_for(num_tasks)
        if self.routing == "task_id" and n != num_tasks:
            raise ValueError(f"routing=task_id needs num_adapters = number of tasks ({num_tasks}), got {n}")
        if self.top_k is not None and self.top_k > n:
            raise ValueError(f"top_k={self.top_k} exceeds num_adapters={n}")

    @property
    def routing_spec(self) -> RoutingSpec:
        return RoutingSpec(self.routing, self.top_k, self.balance_loss)


def load_multitask_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MultiTaskConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate."""
    return load_validated(MultiTaskConfig, path, overrides)


def dump_multitask_config(config: MultiTaskConfig) -> str:
    return dump_config(config)
