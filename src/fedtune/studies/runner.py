"""Run a comparison's grid (settings x variants x seeds) and collect one CSV row per run.

Runs go to ``RUNS/<setting>/<variant>/seed<k>/`` (ordinary run directories). A run whose
``summary.json`` exists is reused, so an interrupted study continues where it stopped,
but only when its stored config is the one the study asks for now: a run left from an
earlier definition (another learning rate, say) is run again rather than reported.

``jobs > 1`` runs that many runs at once, each in its own process: a small model leaves a
large GPU mostly idle, and separate processes keep one run's CPU-side work (data, kernel
launches) from stalling another's. Runs are independent and seeded, so the rows are the
same as one at a time, up to the floating-point effect of giving each process fewer threads.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from fedtune.atomic import write_text
from fedtune.config import RunConfig, dump_config, load_config
from fedtune.errors import UsageError
from fedtune.rundir import RunDir, read_metrics
from fedtune.runtime.engine import build_federation
from fedtune.runtime.simulator import Simulator
from fedtune.studies.definitions import Study


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def study_named(name: str) -> Study:
    from fedtune.studies.definitions import studies

    known = studies()
    try:
        return known[name]
    except KeyError:
        raise UsageError(f"unknown study {name!r}; studies: {', '.join(known)}") from None


def override_list(values: dict[str, object]) -> list[str]:
    """``{"lr": 0.01, "ranks": {4: 0.5}}`` -> ``["lr=0.01", "ranks={4: 0.5}"]``, each value
    written as YAML so that it reads back as exactly the same value (``"yes"`` stays a string)."""
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()
        out.append(f"{key}={text}")
    return out


def reusable(out: Path, config_text: str) -> bool:
    """A finished run made from this resolved config. The stored config is read through
    today's schema, so a setting added since (at a default that keeps the old behaviour)
    does not make a finished run look different."""
    stored = out / "config.yaml"
    if not (out / "summary.json").exists() or not stored.exists():
        return False
    try:
        then = load_config(stored).model_dump(mode="json")
    except UsageError:  # a setting that no longer exists: not the same run
        return False
    return then == RunConfig.model_validate(yaml.safe_load(config_text)).model_dump(mode="json")


def run_one(base: Path | None, overrides: list[str], out: Path) -> dict[str, Any]:
    config = load_config(base, overrides)
    if reusable(out, dump_config(config)):
        return json.loads((out / "summary.json").read_text())
    if (out / "summary.json").exists():
        tqdm.write(f"{out}: its config differs from the comparison's now; running it again", file=sys.stderr)
    simulator = Simulator(build_federation(config), RunDir.create(out, overwrite=True))
    summary = simulator.run()
    del simulator
    gc.collect()
    return summary


def similarity_means(run_dir: Path) -> dict[str, float]:
    """Mean A / B / dW subspace similarity over client pairs (``fedtune analyze``)."""
    from fedtune.analysis import analyze
    from fedtune.analysis.report import summarize, write_report

    analysis = analyze(run_dir)
    write_report(analysis, run_dir / "analysis")
    block = summarize(analysis)["similarity"].get("clients", {})
    return {f"similarity_{m}": block.get(m) for m in ("A", "B", "dW")}


#: what every run reports about its runtime, worth a column when a setting's runs have it
RUNTIME_COLUMNS = ("train_tokens_per_second", "gpu_peak_memory_bytes")


def _limit_threads(threads: int) -> None:
    """A worker process's set-up: its share of the cores, and the parent's quiet libraries."""
    import torch

    from fedtune.console import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()


def _run_in_worker(job: tuple[Path | None, list[str], Path]) -> dict[str, Any]:
    return run_one(*job)


Spec = tuple[Path | None, list[str], Path]  # (base config, overrides, run directory)


def grid(study: Study, runs: Path, size: str, seeds: list[int], extra: list[str] = ()) -> list[tuple[tuple[Any, str, int], Spec]]:
    """((setting, variant label, seed), (base config, overrides, run directory)) for every run.
    ``extra`` (the command line's key=value) applies over everything else."""
    out = []
    for setting in study.settings:
        for label, variant in setting.variants.items():
            for seed in seeds:
                overrides = override_list({**setting.overrides[size], **variant, "seed": seed, "progress": False}) + list(extra)
                out.append(((setting, label, seed), (setting.base_path, overrides, runs / setting.name / slug(label) / f"seed{seed}")))
    return out


def _finished(spec: Spec) -> bool:
    base, overrides, run_dir = spec
    return reusable(run_dir, dump_config(load_config(base, overrides)))


def unfinished_runs(study: Study, runs: Path, size: str, seeds: list[int], extra: list[str] = ()) -> list[str]:
    """'setting / variant / seed k' of every run of the grid not finished with its current config."""
    return [f"{s.name} / {label} / seed {seed}" for (s, label, seed), spec in grid(study, runs, size, seeds, extra) if not _finished(spec)]


def run_study(
    study: Study, runs: Path, size: str, seeds: list[int], jobs: int = 1, finished_only: bool = False, extra: list[str] = ()
) -> list[dict[str, Any]]:
    """Run (or reuse) every run of the grid; ``finished_only`` runs nothing and collects the finished ones."""
    todo = grid(study, runs, size, seeds, extra)
    if finished_only:
        todo = [(key, spec) for key, spec in todo if _finished(spec)]
        if not todo:
            return []
    specs = [spec for _, spec in todo]
    bar = tqdm(total=len(specs), desc=f"{study.name} runs")
    if jobs > 1:
        # spawn, not fork: a forked child of a process that touched CUDA cannot use it
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_limit_threads, initargs=(threads,)) as pool:
            summaries = []
            for summary in pool.map(_run_in_worker, specs):
                summaries.append(summary)
                bar.update(1)
    else:
        summaries = []
        for spec in specs:
            summaries.append(run_one(*spec))
            bar.update(1)
    bar.close()
    return [_row(study, setting, label, seed, spec[2], summary) for ((setting, label, seed), spec), summary in zip(todo, summaries)]


def lower_is_better(metric: str) -> bool:
    return metric.removeprefix("personal_").removeprefix("lowrank_") in ("loss", "perplexity")


def _row(study: Study, setting: Any, label: str, seed: int, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    history = read_metrics(run_dir)
    metric = study.metric or summary["primary_metric"]
    evaluated = [r[metric] for r in history if r.get(metric) is not None]
    row: dict[str, Any] = {
        "setting": setting.name,
        "variant": label,
        "seed": seed,
        "method": summary["method"],
        "run_dir": str(run_dir),
        "primary_metric": metric,
        "final": evaluated[-1] if evaluated else None,
        "best": (min if lower_is_better(metric) else max)(evaluated) if evaluated else None,
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
    for key in RUNTIME_COLUMNS:
        if summary.get(key) is not None:
            row[key] = summary[key]
    for extra in study.extra_metrics:
        values = [r[extra] for r in history if extra in r]
        row[extra] = max(values) if extra.endswith("_bytes") else (values[-1] if values else None)
    if study.analyze:
        row.update(similarity_means(run_dir))
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return path
