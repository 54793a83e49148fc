"""What a comparison's runs are: federated runs (``fedtune run``, the default) or centralised
multi-task runs (``fedtune multitask``: ALoRA vs HydraLoRA vs LoRA, seed 000's first claim).

The engine around them is one: the grid of settings x variants x seeds, records and their
reuse, paired differences, claims. A kind says only how a run's config is read (its schema),
how the run is made, and which numbers of its ``summary.json`` / ``metrics.jsonl`` go in its row:

- ``federated``: the compared metric's final and best value over the evaluated rounds, every
  other final metric, bytes sent each way, client training memory, majority-class floors.
- ``multitask``: the mean of the per-task scores (accuracy, or response-token loss) as the
  compared metric (``mean_accuracy``, ``mean_loss``), each task's score (``accuracy_sst2``), their spread over tasks
  (``spread_std``, population std as the multi-task report prints it, and ``spread_range``)
  and the worst task's score (``worst_accuracy``); nothing is sent, so no byte columns.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedtune.config import RunConfig, load_config
from fedtune.multitask.config import MultiTaskConfig, load_multitask_config
from fedtune.rundir import RunDir
from fedtune.studies.definitions import FLOOR_COLUMNS, RUNTIME_COLUMNS, lower_is_better

@dataclass(frozen=True)
class RunKind:
    name: str
    load: Callable[[Path | None, list[str]], BaseModel]  # (base config file, key=value overrides) -> config
    schema: type[BaseModel]  # what a stored config.yaml is read through (``config_key``)
    execute: Callable[[BaseModel, Path], None]  # make the run in a fresh run directory
    #: (summary, metrics.jsonl rows, compared metric or None for the default, reach) -> the row's numbers
    row: Callable[[dict[str, Any], list[dict[str, Any]], str | None, float | None], dict[str, Any]]


# -- federated runs ---------------------------------------------------------------------------------
def _run_federated(config: BaseModel, out: Path) -> None:
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator

    simulator = Simulator(build_federation(config), RunDir.create(out, overwrite=True))
    simulator.run()
    del simulator
    gc.collect()


def _federated_row(summary: dict[str, Any], history: list[dict[str, Any]], metric: str | None, reach: float | None) -> dict[str, Any]:
    metric = metric or summary["primary_metric"]
    evaluated = [r[metric] for r in history if r.get(metric) is not None]
    lower = lower_is_better(metric)
    row: dict[str, Any] = {
        "method": summary["method"],
        "clients": summary.get("clients"),
        "primary_metric": metric,
        "final": evaluated[-1] if evaluated else None,
        "best": (min if lower else max)(evaluated) if evaluated else None,
        "total_bytes_up": summary["total_bytes_up"],
        "total_bytes_down": summary["total_bytes_down"],
        "client_train_state_bytes": max((int(r.get("client_train_state_bytes", 0)) for r in history), default=0),
        "wall_seconds": summary["wall_seconds"],
        "trainable_params": summary["trainable_params"],
        "device": summary.get("accelerator") or summary.get("device"),
        "precision": summary.get("precision", "fp32"),
    }
    for key, value in summary["final"].items():
        row[f"final_{key}"] = value
    for key, value in (summary.get("initial") or {}).items():
        row[f"initial_{key}"] = value
    for key in (*FLOOR_COLUMNS, *RUNTIME_COLUMNS):
        if summary.get(key) is not None:
            row[key] = summary[key]
    if reach is not None:
        reached = [r for r in history if r.get(metric) is not None and (r[metric] <= reach if lower else r[metric] >= reach)]
        row["bytes_up_to_reach"] = reached[0]["cumulative_bytes_up"] if reached else None
    return row


# -- centralised multi-task runs ------------------------------------------------------------------
def _run_multitask(config: BaseModel, out: Path) -> None:
    from fedtune.multitask.train import prepare, run_multitask

    job = prepare(config)  # type: ignore[arg-type]
    run_multitask(job, RunDir.create(out, overwrite=True))
    del job
    gc.collect()


def _multitask_row(summary: dict[str, Any], history: list[dict[str, Any]], metric: str | None, reach: float | None) -> dict[str, Any]:
    score = summary["score_metric"]  # ``metric`` and ``reach`` are refused for this kind when the file is read
    lower = not summary["higher_is_better"]
    means = [float(r["mean"]) for r in history if r.get("mean") is not None and r.get("step") != 0]  # step 0: untrained
    row: dict[str, Any] = {
        "method": summary["variant"],
        "primary_metric": f"mean_{score}",
        "final": summary["mean"],
        "best": (min if lower else max)(means) if means else None,
        "wall_seconds": summary["wall_seconds"],
        "trainable_params": summary["params"]["trainable"],
        "device": summary.get("device"),
        "precision": summary.get("precision", "fp32"),
    }
    for task, value in zip(_short_names(list(summary["scores"])), summary["scores"].values()):
        row[f"final_{score}_{task}"] = value
    floors = summary.get("majority_class_accuracy", {})  # what always giving the most frequent training answer scores
    for task, floor in zip(_short_names(list(floors)), floors.values()):
        row[f"majority_{task}"] = floor
    initial = summary.get("initial_scores") or {}  # the base model's scores (eval_initial), the other floor
    for task, value in zip(_short_names(list(initial)), initial.values()):
        row[f"untrained_{task}"] = value
    row["final_spread_std"] = summary["spread"]["std"]
    row["final_spread_range"] = summary["spread"]["range"]
    row[f"final_worst_{score}"] = summary["max"] if lower else summary["min"]
    return row


def _short_names(tasks: list[str]) -> list[str]:
    """``glue/sst2`` -> ``sst2``, ``data/mine.jsonl`` -> ``mine``: column names, unless two would be one."""
    short = [re.sub(r"(\.(jsonl|json|csv|parquet|gz))+$", "", t.rsplit("/", 1)[-1]) for t in tasks]
    return short if len(set(short)) == len(short) else tasks


KINDS = {
    "federated": RunKind("federated", load_config, RunConfig, _run_federated, _federated_row),
    "multitask": RunKind("multitask", load_multitask_config, MultiTaskConfig, _run_multitask, _multitask_row),
}
