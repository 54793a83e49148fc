"""``fedtune eval RUN_DIR --tasks ...``: score a finished run's exported models on built-in tasks.

For each task it scores the base model alone (the floor), the run's global model and, where
the method exports them, every client's personal model, with the same evaluation code as
training (answer log-likelihood for multiple choice, exact match of a greedy generation's
final answer for math, accuracy for classification). It writes ``RUN_DIR/eval/<task>.json``
and ``RUN_DIR/eval/table.md``, and returns the table's text.

A task must fit the run's model: generation tasks for a causal-LM run; for a classification
run, classification tasks with as many labels as its head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedtune.atomic import write_text
from fedtune.errors import UsageError

VARIANT_BASE, VARIANT_GLOBAL = "base", "global"


def _exports(run_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The global export folder and the personal ones, by name."""
    for fmt in ("adapter", "merged", "model"):
        if (run_dir / fmt).is_dir():
            personal = {
                f"client-{p.parent.name}": p for p in sorted((run_dir / "clients").glob(f"*/{fmt}"), key=lambda p: int(p.parent.name))
            } if (run_dir / "clients").is_dir() else {}  # fmt: skip
            return run_dir / fmt, personal
    raise UsageError(f"{run_dir} has no exported model (adapter/, merged/ or model/): is the run finished?")


def _models(config: Any, loaded_base: torch.nn.Module, kind: str, num_labels: int, global_dir: Path, personal: dict[str, Path]):
    """(name, model) for the base, the global and each personal model, one at a time.
    ``loaded_base`` is the base as already loaded; merged exports need a fresh base each."""
    from peft import PeftModel

    from fedtune.models.loading import load_model

    def base():
        return load_model(config.model, kind, num_labels, seed=config.seed, quantize=config.quantize).model

    fmt = global_dir.name
    model = loaded_base
    yield VARIANT_BASE, model
    if fmt == "adapter":
        peft_model = PeftModel.from_pretrained(model, global_dir, adapter_name=VARIANT_GLOBAL).eval()
        yield VARIANT_GLOBAL, peft_model
        for name, folder in personal.items():
            peft_model.load_adapter(folder, adapter_name=name)
            peft_model.set_adapter(name)
            yield name, peft_model
            peft_model.set_adapter(VARIANT_GLOBAL)
            peft_model.delete_adapter(name)
        return
    for name, folder in {VARIANT_GLOBAL: global_dir, **personal}.items():
        if fmt == "merged":
            from safetensors.torch import load_file

            model = base()
            model.load_state_dict(load_file(str(folder / "merged_weights.safetensors")), strict=False)
        else:
            from fedtune.models.loading import _from_pretrained

            model = _from_pretrained(folder, kind, num_labels).eval()
        yield name, model


def score_run(run_dir: Path, tasks: list[str], max_examples: int | None = None, device: str = "auto", data_dir: str | None = None) -> str:
    from fedtune.config import load_config
    from fedtune.data.encode import encode_classification, encode_generation, encode_scored
    from fedtune.data.federated import _cap, field_map
    from fedtune.data.sources import BUILTINS, load_task, load_tasks
    from fedtune.models.loading import load_model
    from fedtune.runtime.engine import pick_device
    from fedtune.runtime.evaluation import PRIMARY_METRIC, evaluate
    from fedtune.runtime.local_training import resolve_precision

    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir} is not a fedtune run directory (no config.yaml)")
    unknown = [t for t in tasks if t not in BUILTINS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; built-in tasks: {', '.join(BUILTINS)}")
    if max_examples is not None and max_examples < 1:
        raise UsageError("--max-examples must be at least 1")
    config = load_config(run_dir / "config.yaml")
    global_dir, personal = _exports(run_dir)
    # the model's kind and head size are the training task's, as the run saw it
    trained_on = load_tasks(config.dataset, config.data_dir, field_map(config), config.task, config.seed, config.test_dataset)
    if trained_on.modality != "text":
        raise UsageError("fedtune eval scores text runs; an image run's test accuracy is in its metrics.jsonl")
    run_kind, run_labels = trained_on.kind, trained_on.num_labels
    torch_device = pick_device(device)
    precision = resolve_precision(config.precision, torch_device)
    loaded_tasks = {}
    for name in tasks:
        task = load_task(name, data_dir or config.data_dir, {}, "auto", config.seed)
        if task.kind != run_kind or (run_kind == "classification" and task.num_labels != run_labels):
            labels = f" with {task.num_labels} labels" if task.kind == "classification" else ""
            raise UsageError(f"task {name} is a {task.kind} task{labels}; the run's model is a {run_kind} model" + (f" with {run_labels} labels" if run_kind == "classification" else ""))
        loaded_tasks[name] = task
    loaded = load_model(config.model, run_kind, run_labels, seed=config.seed, quantize=config.quantize)
    tokenizer = loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    encoded = {}
    for name, task in loaded_tasks.items():
        rows = _cap(task.test, max_examples, config.seed)
        if run_kind == "classification":
            encoded[name] = (task, len(rows), encode_classification(rows, tokenizer, config.max_seq_len), [])
        else:
            scored = encode_scored(rows, tokenizer, config.max_seq_len) if task.metric in ("multiple_choice", "exact_match") else []
            encoded[name] = (task, len(rows), encode_generation(rows, tokenizer, config.max_seq_len), scored)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in tasks}
    for variant, model in _models(config, loaded.model, run_kind, run_labels, global_dir, personal):
        model.to(torch_device)
        for name, (task, _, examples, scored) in encoded.items():
            with torch.no_grad():
                results[name][variant] = evaluate(
                    model, task.metric, examples, scored, config.eval_batch_size, pad_id, torch_device, precision,
                    tokenizer, config.max_new_tokens,
                )  # fmt: skip
    out = run_dir / "eval"
    lines = ["| task | metric | examples | " + " | ".join(results[tasks[0]]) + " |", "|---|---|---|" + "---|" * len(results[tasks[0]])]
    for name in tasks:
        task, n, _, _ = encoded[name]
        primary = PRIMARY_METRIC[task.metric]
        record = {"task": name, "metric": primary, "examples": n, "source": task.source, "precision": precision, "results": results[name]}
        write_text(out / f"{name}.json", json.dumps(record, indent=2) + "\n")
        lines.append(f"| {name} | {primary} | {n} | " + " | ".join(f"{r.get(primary, float('nan')):.4f}" for r in results[name].values()) + " |")
    table = "\n".join(lines) + "\n"
    write_text(out / "table.md", f"# Evaluation of {run_dir.name}\n\nbase: the base model alone; global: the run's global model; client-k: client k's personal model.\n\n" + table)
    return table
