"""A centralised multi-task run, top to bottom.

1. ``prepare``: load every task's rows (input errors surface here), the base model, tokens; inject
   the adapters (ALoRA / HydraLoRA / LoRA) and one head per task (classification).
2. ``train``: each step samples a task (``task_sampling``: proportional to its capped training
   rows, or uniform), takes that task's next batch (reshuffled every pass over the task) and
   takes one AdamW step on the adapters, routers and heads; the base model stays frozen. Loss:
   cross-entropy with the task's own head (classification) or the response-token LM loss
   (generation), plus ``balance_loss`` × the Switch load-balancing term when set.
3. evaluate every ``eval_every`` steps and at the end: each task's test rows with its own head and
   the task set in the routing context; routing weights are averaged per task over real tokens and
   layers while evaluating.
4. write ``metrics.jsonl`` (one row per evaluation), ``summary.json``, ``adapter/``, ``plots/``.

One seed fixes the adapters' and heads' init, the task order, the batches and dropout: a run
repeats bit for bit on the same machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedtune.data.encode import Batch
from fedtune.models.loading import load_model
from fedtune.multitask.config import MultiTaskConfig, dump_multitask_config
from fedtune.multitask.data import EncodedTask, TaskRowSet, encode_tasks, load_task_rows
from fedtune.multitask.export import adapter_config, save_adapter
from fedtune.multitask.model import AdapterSpec, MultiTaskModel, resolve_targets
from fedtune.multitask.report import score_stats, write_plots
from fedtune.rundir import RunDir
from fedtune.runtime.engine import derive_seed, pick_device, set_determinism
from fedtune.runtime.evaluation import evaluate_classification, evaluate_language_model, evaluate_multiple_choice
from fedtune.runtime.local_training import autocast, batches, resolve_precision


@dataclass
class MultiTaskJob:
    config: MultiTaskConfig
    kind: str
    tasks: list[EncodedTask]
    mt: MultiTaskModel
    device: torch.device
    #: the compute precision actually used (``precision=auto`` resolved for the device)
    precision: str = "fp32"
    #: what the tasks are scored by (``TaskRowSet.metric``)
    metric: str = "accuracy"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def score_metric(self) -> str:
        # the metric whose mean and spread are reported: accuracy, answer log-likelihood accuracy, or the response-token loss
        return {"accuracy": "accuracy", "multiple_choice": "mc_accuracy"}.get(self.metric, "loss")

    @property
    def higher_is_better(self) -> bool:
        return self.score_metric != "loss"


def prepare(config: MultiTaskConfig, rows: TaskRowSet | None = None) -> MultiTaskJob:
    """Data, model and adapters; every input error is raised before anything is trained."""
    set_determinism(config)
    device = pick_device(config.device)
    rows = rows if rows is not None else load_task_rows(config)
    label_counts = [t.num_labels for t in rows.tasks] if rows.kind == "classification" else None
    loaded = load_model(config.model, rows.kind, num_labels=max(label_counts or [0]), seed=config.seed)
    tasks = encode_tasks(rows, loaded.tokenizer, config.max_seq_len)
    spec = AdapterSpec(
        config.variant, config.adapters_for(len(tasks)), config.r, config.alpha, config.routing_spec,
        resolve_targets(loaded, config.target_modules),
    )  # fmt: skip
    mt = MultiTaskModel(loaded, spec, label_counts, config.seed)
    mt.model.to(device)
    return MultiTaskJob(config, rows.kind, tasks, mt, device, resolve_precision(config.precision, device), rows.metric)


class TaskSampler:
    """The task of each training batch, drawn from a seeded generator."""

    def __init__(self, train_sizes: list[int], mode: str, seed: int) -> None:
        weights = [float(n) for n in train_sizes] if mode == "proportional" else [1.0] * len(train_sizes)
        self.probs = torch.tensor(weights) / sum(weights)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 0x7A5C))

    def next(self) -> int:
        return int(torch.multinomial(self.probs, 1, generator=self.generator))


def task_loss(job: MultiTaskJob, batch: Batch) -> torch.Tensor:
    model = job.mt.model
    if job.kind == "classification":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.labels)
    # token labels are -100 on the prompt: the model's own shifted loss covers the response only
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


@torch.no_grad()
def evaluate_tasks(job: MultiTaskJob, progress: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Per-task metrics, and the mean routing weights per task (over real tokens and layers)."""
    config, mt = job.config, job.mt
    evaluate = evaluate_classification if job.kind == "classification" else evaluate_language_model
    mt.model.eval()
    recorder = mt.record_routing(len(job.tasks))
    metrics: dict[str, dict[str, float]] = {}
    try:
        for index, task in enumerate(tqdm(job.tasks, desc="evaluating", leave=False, disable=not progress)):
            mt.use_task(index)
            metrics[task.name] = evaluate(
                mt.model, task.test, config.eval_batch_size, mt.loaded.pad_token_id, job.device, job.precision
            )
            if task.scored:  # scoring the candidates is not the task's text: keep it out of the routing means
                with mt.recording_paused():
                    metrics[task.name] |= evaluate_multiple_choice(
                        mt.model, task.scored, config.eval_batch_size, mt.loaded.pad_token_id, job.device, job.precision
                    )
    finally:
        mt.stop_recording()
    if mt.spec.num_adapters == 1:  # no routing: the single adapter has all the weight
        router = {name: [1.0] for name in job.names}
    else:
        means = recorder.means()
        router = {name: [float(w) for w in means[i]] for i, name in enumerate(job.names)}
    return metrics, router


class _TrainTotals:
    """Training losses since the last evaluation, overall and per task."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.loss = {n: 0.0 for n in self.names}
        self.steps = {n: 0 for n in self.names}
        self.balance, self.balance_steps = 0.0, 0

    def add(self, task: str, loss: float, balance: float | None) -> None:
        self.loss[task] += loss
        self.steps[task] += 1
        if balance is not None:
            self.balance += balance
            self.balance_steps += 1

    def row(self) -> dict[str, Any]:
        total = sum(self.steps.values())
        row: dict[str, Any] = {
            "train_loss": sum(self.loss.values()) / total if total else None,
            "train_loss_per_task": {n: self.loss[n] / self.steps[n] for n in self.names if self.steps[n]},
            "train_steps_per_task": dict(self.steps),
        }
        if self.balance_steps:
            row["balance_loss"] = self.balance / self.balance_steps
        return row


def _eval_row(job: MultiTaskJob, step: int, totals: _TrainTotals, progress: bool) -> dict[str, Any]:
    metrics, router = evaluate_tasks(job, progress)
    scores = {name: metrics[name][job.score_metric] for name in job.names}
    stats = score_stats(scores)
    return {
        "step": step,
        **totals.row(),
        "tasks": metrics,
        "scores": scores,
        "mean": stats["mean"],
        "std": stats["std"],
        "range": stats["range"],
        "router_weights": router,
    }


def _batch_streams(job: MultiTaskJob) -> list[Iterator[Batch]]:
    config = job.config
    return [
        batches(task.train, config.batch_size, config.steps, torch.Generator().manual_seed(derive_seed(config.seed, 0xBA7C, i)), job.mt.loaded.pad_token_id)
        for i, task in enumerate(job.tasks)
    ]


def train(job: MultiTaskJob, run_dir: RunDir | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The training loop; returns the evaluation rows and the time spent training / evaluating."""
    config, mt = job.config, job.mt
    params = mt.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = TaskSampler([len(t.train) for t in job.tasks], config.task_sampling, config.seed)
    streams = _batch_streams(job)
    totals = _TrainTotals(job.names)
    rows: list[dict[str, Any]] = []
    train_seconds = eval_seconds = 0.0
    if config.eval_initial:
        start = time.perf_counter()
        row = _eval_row(job, 0, totals, config.progress)
        eval_seconds += time.perf_counter() - start
        row["seconds"] = eval_seconds
        rows.append(row)
        if run_dir is not None:
            run_dir.append_metrics(row)
    bar = tqdm(range(1, config.steps + 1), desc=f"{config.variant} steps", disable=not config.progress)
    for step in bar:
        start = time.perf_counter()
        mt.model.train()
        task = sampler.next()
        mt.use_task(task)
        batch = next(streams[task]).to(job.device)
        with autocast(job.device, job.precision):
            loss = task_loss(job, batch)
            balance = mt.take_balance_loss()
        total = loss if balance is None else loss + config.balance_loss * balance
        total.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals.add(job.names[task], float(loss.detach()), None if balance is None else float(balance.detach()))
        train_seconds += time.perf_counter() - start
        if step % 10 == 0 or step == config.steps:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step == config.steps or (config.eval_every is not None and step % config.eval_every == 0):
            start = time.perf_counter()
            row = _eval_row(job, step, totals, config.progress)
            eval_seconds += time.perf_counter() - start
            row["seconds"] = train_seconds + eval_seconds
            totals.reset()
            rows.append(row)
            if run_dir is not None:
                run_dir.append_metrics(row)
    bar.close()
    return rows, {"train_seconds": train_seconds, "eval_seconds": eval_seconds}


def per_layer_counts(mt: MultiTaskModel) -> dict[str, int]:
    """Trainable parameters of each distinct layer shape, e.g. ``"384x384": 16896``."""
    counts: dict[str, int] = {}
    for layer in mt.layers.values():
        key = f"{layer.d_out}x{layer.d_in}"
        counts[key] = sum(p.numel() for p in layer.adapter_parameters())
    return counts


def build_summary(job: MultiTaskJob, rows: list[dict[str, Any]], timings: dict[str, float], wall: float) -> dict[str, Any]:
    config, spec, final = job.config, job.mt.spec, rows[-1]
    stats = score_stats(final["scores"])
    return {
        "variant": config.variant,
        "model": config.model,
        "task_kind": job.kind,
        "tasks": job.names,
        **spec.describe(),
        "balance_loss": spec.routing.balance_loss,
        "task_sampling": config.task_sampling,
        "steps": config.steps,
        "score_metric": job.score_metric,
        "higher_is_better": job.higher_is_better,
        "scores": final["scores"],
        "mean": stats["mean"],
        "spread": {"std": stats["std"], "range": stats["range"]},
        "min": stats["min"],
        "max": stats["max"],
        "per_task": final["tasks"],
        "majority_class_accuracy": {t.name: t.majority_floor for t in job.tasks if t.majority_floor is not None},
        # the base model's scores (eval_initial): what the same rows gave before any training
        "initial_scores": rows[0]["scores"] if rows[0]["step"] == 0 else None,
        "router_weights": final["router_weights"],
        "params": {**job.mt.parameter_counts(), "per_layer": per_layer_counts(job.mt), "layers": len(job.mt.layers)},
        "train_examples_per_task": {t.name: len(t.train) for t in job.tasks},
        "eval_examples_per_task": {t.name: len(t.test) for t in job.tasks},
        **timings,
        "seconds_per_step": timings["train_seconds"] / config.steps,
        "wall_seconds": wall,
    }


def run_multitask(job: MultiTaskJob, run_dir: RunDir) -> dict[str, Any]:
    """Train, evaluate and write the whole run directory; returns the summary."""
    start = time.perf_counter()
    run_dir.write_config(dump_multitask_config(job.config))
    rows, timings = train(job, run_dir)
    summary = build_summary(job, rows, timings, time.perf_counter() - start)
    label_counts = [t.num_labels for t in job.tasks]
    save_adapter(job.mt, run_dir.path / "adapter", adapter_config(job.mt, job.config.model, job.kind, job.names, label_counts))
    write_plots(summary, rows, run_dir.path / "plots")
    summary["wall_seconds"] = time.perf_counter() - start
    summary["precision"] = job.precision
    summary["device"] = job.device.type
    run_dir.write_summary(summary)
    return summary
