"""A comparison's Markdown report: per setting, a mean +- std table per variant, paired
differences against the reference with 95 % intervals and a verdict, plots across seeds,
and the Pareto view (metric against uplink bytes and against client memory)."""

from __future__ import annotations

import math
import os
import platform
import statistics
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

from fedtune.atomic import write_text
from fedtune.plots import line_plot, scatter_plot
from fedtune.rundir import read_metrics
from fedtune.studies.definitions import FLOOR, FLOOR_COLUMNS, RUNTIME_COLUMNS, Study, lower_is_better
from fedtune.studies.runner import similarity_grids, write_csv


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    present = [float(v) for v in values if v is not None and v == v]
    if not present:
        return float("nan"), float("nan"), 0
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0, len(present)


def fmt(values: Sequence[float | None], scale: float = 1.0, digits: int = 4) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def hardware() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.platform()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def _curves(rows: list[dict[str, Any]], metric: str, x: str) -> dict[str, tuple[list[float], list[float]]]:
    """variant -> (x, mean metric) over seeds, per round."""
    by_variant: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        by_variant[row["variant"]].append([r for r in read_metrics(Path(row["run_dir"])) if metric in r])
    curves = {}
    for variant, histories in by_variant.items():
        length = min(len(h) for h in histories)
        xs = [statistics.fmean(float(h[i][x]) for h in histories) for i in range(length)]
        ys = [statistics.fmean(float(h[i][metric]) for h in histories) for i in range(length)]
        curves[variant] = (xs, ys)
    return curves


def plot_setting(rows: list[dict[str, Any]], metric: str, out_dir: Path, prefix: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for x, label, scale in (("round", "round", 1.0), ("cumulative_bytes_up", "cumulative uplink (MiB)", 2**-20)):
        curves = {variant: ([v * scale for v in xs], ys) for variant, (xs, ys) in _curves(rows, metric, x).items()}
        path = out_dir / f"{prefix}_{metric}_vs_{'round' if x == 'round' else 'uplink'}.png"
        written.append(line_plot(curves, label, f"{metric} (mean over seeds)", path, figsize=(6.5, 4), dpi=110, integer_x=x == "round"))
    return written


def plot_multitask_setting(rows: list[dict[str, Any]], metric: str, out_dir: Path, prefix: str) -> list[Path]:
    """The mean score over tasks against the training step (a multi-task run evaluates every ``eval_every`` steps)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{prefix}_{metric}_vs_step.png"
    return [line_plot(_curves(rows, "mean", "step"), "training step", f"mean {metric} over tasks (mean over seeds)", path, figsize=(6.5, 4), dpi=110)]


def _extra_cell(values: list[Any], column: str) -> str:
    if column.endswith("_bytes"):
        return fmt(values, 2**-20, 1) + " MiB"
    if column == "train_tokens_per_second":
        return fmt(values, digits=0)
    return fmt(values)


# -- paired differences against the reference variant --------------------------------------------
@dataclass(frozen=True)
class Paired:
    """variant - reference on the same seeds: mean, 95 % t interval, and what it says."""

    seeds: int
    mean: float
    low: float
    high: float
    verdict: str


def paired_difference(variant: dict[int, float], reference: dict[int, float], lower_better: bool) -> Paired | None:
    """Seed by seed (a seed fixes data split, init and sampling for both, so the seed-to-seed
    spread cancels); Student's t interval with n - 1 degrees of freedom."""
    seeds = sorted(set(variant) & set(reference))
    if not seeds:
        return None
    diffs = [variant[s] - reference[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(1, mean, math.nan, math.nan, "one seed: no interval")
    half = scipy.stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    if low > 0 or high < 0:
        verdict = "worse" if (low > 0) == lower_better else "better"
    else:
        verdict = f"not distinguishable at {len(diffs)} seeds"
    return Paired(len(diffs), mean, low, high, verdict)


def _paired_lines(setting_rows: list[dict[str, Any]], variants: Sequence[str], reference: str, metric: str) -> list[str]:
    by_variant: dict[str, dict[int, float]] = defaultdict(dict)
    for row in setting_rows:
        if row["final"] is not None and row["final"] == row["final"]:
            by_variant[row["variant"]][int(row["seed"])] = float(row["final"])
    if reference not in by_variant:
        return [f"No finished run of the reference `{reference}`: no paired differences.", ""]
    lower = lower_is_better(metric)
    lines = [
        f"### Paired differences against `{reference}`",
        "",
        f"Final {metric} of each variant minus the reference's, on the same seed; mean and 95 % t interval over seeds "
        f"({'lower' if lower else 'higher'} {metric} is better).",
        "",
        "| variant | seeds | difference | 95 % interval | verdict |",
        "|---|---|---|---|---|",
    ]
    for variant in variants:
        if variant == reference or variant not in by_variant:
            continue
        paired = paired_difference(by_variant[variant], by_variant[reference], lower)
        if paired is None:
            lines.append(f"| {variant} | 0 | – | – | no seed in common with the reference |")
            continue
        interval = "–" if math.isnan(paired.low) else f"[{paired.low:+.4f}, {paired.high:+.4f}]"
        lines.append(f"| {variant} | {paired.seeds} | {paired.mean:+.4f} | {interval} | {paired.verdict} |")
    return [*lines, ""]


# -- the Pareto view --------------------------------------------------------------------------------
def pareto_front(points: dict[str, tuple[float, float]], lower_better: bool) -> frozenset[str]:
    """Variants no other variant beats on both: metric (first) and cost (second, lower is better)."""

    def at_least_as_good(a: tuple[float, float], b: tuple[float, float]) -> bool:
        metric_ok = a[0] <= b[0] if lower_better else a[0] >= b[0]
        return metric_ok and a[1] <= b[1]

    return frozenset(
        name for name, p in points.items() if not any(o != p and at_least_as_good(o, p) for other, o in points.items() if other != name)
    )


def centralised_variants(setting_rows: list[dict[str, Any]]) -> list[str]:
    """Variants trained on a single client: a centralised run, whose uplink is no federation's."""
    return [v for v in dict.fromkeys(r["variant"] for r in setting_rows) if all(r.get("clients") == 1 for r in setting_rows if r["variant"] == v)]


def _pareto_lines(setting_rows: list[dict[str, Any]], metric: str, figures: Path, link: str, prefix: str) -> list[str]:
    lines = ["### Pareto view", ""]
    lower = lower_is_better(metric)
    centralised = centralised_variants(setting_rows)
    for column, label, scale in (("total_bytes_up", "uplink per run (MiB)", 2**-20), ("client_train_state_bytes", "client training memory (MiB)", 2**-20)):
        points: dict[str, tuple[float, float]] = {}
        left_out = centralised if column == "total_bytes_up" else []
        for variant in dict.fromkeys(r["variant"] for r in setting_rows):
            if variant in left_out:
                continue
            vr = [r for r in setting_rows if r["variant"] == variant and r["final"] is not None and r["final"] == r["final"]]
            if vr and all(r.get(column) for r in vr):
                points[variant] = (statistics.fmean(float(r["final"]) for r in vr), statistics.fmean(float(r[column]) for r in vr) * scale)
        if len(points) < 2:
            continue
        if left_out:
            named = ", ".join(f"`{v}`" for v in left_out)
            lines += [f"Left out of the uplink view: {named}, trained on one client, uploads one model once and is no federation.", ""]
        front = pareto_front(points, lower)
        path = scatter_plot({k: (c, m) for k, (m, c) in points.items()}, label, f"final {metric} (mean over seeds)", figures / f"{prefix}_{metric}_vs_{column}.png", front)
        lines += [f"Not beaten on both final {metric} and {label.split(' (')[0]}: {', '.join(f'`{v}`' for v in points if v in front)}.", "", f"![{path.stem}]({link}/{path.name})", ""]
    return lines if len(lines) > 2 else []


def similarity_heatmaps(rows: list[dict[str, Any]], out_dir: Path, prefix: str) -> list[Path]:
    """Client x client similarity of A and of B (seed 000's Figure 1), each pair's module-mean
    value averaged over the seeds whose runs kept their grids (``similarity.json``)."""
    from fedtune.analysis.report import heatmap

    written = []
    for matrix in ("A", "B"):
        mean = mean_similarity_grid(rows, matrix)
        if mean is None:
            return []
        clients, grid, seeds = mean
        out_dir.mkdir(parents=True, exist_ok=True)
        title = f"{prefix}\nsimilarity of {matrix} (mean over {seeds} seed{'s' if seeds > 1 else ''})"
        written.append(heatmap(grid, clients, clients, title, "client", "client", out_dir / f"{prefix}_similarity_{matrix}.png"))
    return written


def mean_similarity_grid(rows: list[dict[str, Any]], matrix: str) -> tuple[list[str], np.ndarray, int] | None:
    """(clients, client x client grid of ``matrix`` averaged over the runs, how many runs), over
    the runs that kept grids for the first such run's clients; None with fewer than two clients."""
    kept = [g for g in (similarity_grids(Path(r["run_dir"])) for r in rows) if g is not None]
    if not kept or len(kept[0][0]) < 2:
        return None
    clients = kept[0][0]
    grids = [grids[matrix] for labels, grids in kept if labels == clients]
    stack = np.array([[[np.nan if v is None else v for v in row] for row in grid] for grid in grids], dtype=float)
    with warnings.catch_warnings():  # a pair undefined in every run stays NaN (drawn as a dash)
        warnings.simplefilter("ignore", RuntimeWarning)
        return clients, np.nanmean(stack, axis=0), len(grids)


# -- the report -------------------------------------------------------------------------------------
def _more_seeds(study: Study) -> str:
    extra = [f"{label} in {s.name} also {list(seeds)}" for s in study.settings for label, seeds in s.more_seeds.items()]
    return f" ({'; '.join(extra)})" if extra else ""


def write_report(
    study: Study,
    rows: list[dict[str, Any]],
    path: Path,
    size: str,
    seeds: list[int],
    wall_seconds: float,
    command: str,
    skipped: Sequence[str] = (),
    missing: Sequence[str] = (),
    figures: Path | None = None,
    csv_name: str | None = None,
) -> Path:
    """The Markdown report at ``path``, its plots in ``figures`` (default: beside it, in a folder
    named like the report); ``csv_name``: the runs' CSV beside it (default: named like the report)."""
    figures = figures or path.parent / path.stem
    link = os.path.relpath(figures, path.parent)
    precisions = sorted({str(r.get("precision", "fp32")) for r in rows})
    lines = [
        f"# `{study.name}`",
        "",
        *([study.question, ""] if study.question else []),
        f"- Size: **{size}**; seeds {seeds}{_more_seeds(study)}.",
        f"- Report written on: {hardware()}.",
        f"- Runs' device and precision (from their summaries): {', '.join(sorted({str(r.get('device')) for r in rows}))}, {', '.join(precisions)}.",
        f"- Wall time of the runs: {wall_seconds / 60:.1f} min, summed over runs (runs reused from an earlier invocation count their own time; runs made with `--jobs` overlap).",
        f"- Reproduce: `{command}`; every run directory is listed in `{csv_name or path.with_suffix('.csv').name}`.",
        "",
    ]
    if skipped:
        lines += [f"**Partial report**: not run for it: {'; '.join(skipped)}.", ""]
    if missing:
        lines += [f"**Partial report**: {len(rows)} of {len(rows) + len(missing)} runs finished; not finished: {'; '.join(missing)}.", ""]
    reference = study.reference or next(iter(study.settings[0].variants))
    for setting in study.settings:
        setting_rows = [r for r in rows if r["setting"] == setting.name]
        if not setting_rows:
            continue
        metric = setting_rows[0]["primary_metric"]
        lines += [f"## {setting.name}", "", f"Base config `{setting.base or 'inline'}` with the `{size}` overrides {setting.overrides[size]}.", ""]
        lines += _variant_table(study, setting, setting_rows, metric, bool(missing))
        lines += _floor_lines(setting_rows) if study.kind == "federated" else _task_floor_lines(setting_rows)
        if len(setting.variants) > 1:
            lines += _paired_lines(setting_rows, list(setting.variants), reference, metric)
        if study.analyze:
            for plot in similarity_heatmaps(setting_rows, figures, setting.name):
                lines.append(f"![{plot.stem}]({link}/{plot.name})")
            lines.append("")
        elif study.kind == "multitask":
            lines += [f"![{plot.stem}]({link}/{plot.name})" for plot in plot_multitask_setting(setting_rows, metric, figures, setting.name)] + [""]
        else:
            for plot in plot_setting(setting_rows, metric, figures, setting.name):
                lines.append(f"![{plot.stem}]({link}/{plot.name})")
            lines.append("")
            lines += _pareto_lines(setting_rows, metric, figures, link, setting.name)
    if study.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in study.notes] + [""]
    if study.claims:
        verdicts = claim_verdicts(study, rows)
        lines += _claim_lines(study, verdicts)
        if verdicts:
            write_csv(verdicts, path.with_name(f"{path.stem}-claims.csv"))
    write_text(path, "\n".join(lines))
    return path


def _floor_per_seed(rows: list[dict[str, Any]], column: str) -> list[float]:
    """One value of ``column`` per seed, the first row's: a floor depends on the seed's data
    only, so every variant of a seed repeats it, and counting each run would shrink its spread."""
    by_seed: dict[int, float] = {}
    for r in rows:
        if r.get(column) not in (None, ""):
            by_seed.setdefault(int(r["seed"]), float(r[column]))
    return list(by_seed.values())


def _floor_lines(setting_rows: list[dict[str, Any]]) -> list[str]:
    """The scores of always answering the most frequent training class (they depend on the
    seed's partition only, so every variant of a seed has the same)."""
    parts = []
    for column, where in zip(FLOOR_COLUMNS, ("global test set", "clients' own test splits, mean over clients")):
        # the first variant's partition: a variant with its own (a one-client ceiling) has its own floor
        if values := _floor_per_seed(setting_rows, column):
            parts.append(f"{fmt(values)} on the {where}")
    lines = []
    if parts:
        lines += [
            f"Majority-class floor (each answer the most frequent training class; mean ± std over seeds): {'; '.join(parts)}. "
            "A personalised accuracy is judged against its floor, not against global accuracy.",
            "",
        ]
    metric = setting_rows[0]["primary_metric"]
    if initial := _floor_per_seed(setting_rows, f"initial_{metric}"):
        lines += [f"Before training (the model every client starts from: the base model for LoRA methods), {metric} on the global test set: {fmt(initial)} (mean ± std over seeds).", ""]
    return lines


def _task_floor_lines(setting_rows: list[dict[str, Any]]) -> list[str]:
    """A multi-task setting's floor per task: always giving the most frequent training answer."""
    def per_task(prefix: str) -> dict[str, list[float]]:
        keys = dict.fromkeys(k for r in setting_rows for k in r if k.startswith(prefix))
        return {k.removeprefix(prefix): _floor_per_seed(setting_rows, k) for k in keys}

    lines = []
    floors = per_task("majority_")
    if floors:
        cells = ", ".join(f"{task} {fmt(values)}" for task, values in floors.items())
        lines.append(f"Majority-class floor per task (always the most frequent training label or answer position, on the test rows; mean ± std over seeds): {cells}. A task scored at its floor was not learned.")
    untrained = per_task("untrained_")
    if untrained:  # every variant starts from the base model, so each run measured the same floor
        cells = ", ".join(f"{task} {fmt(values)}" for task, values in untrained.items())
        lines.append(f"The untrained base model on the same rows (`eval_initial`; mean ± std over seeds): {cells}.")
    return [line for text in lines for line in (text, "")]


# -- claims and their verdicts ---------------------------------------------------------------------
def _metric_value(row: dict[str, Any], metric: str) -> float | None:
    value = row["final"] if metric == row["primary_metric"] else row.get(f"final_{metric}", row.get(metric))
    return None if value is None or value != value else float(value)


def _floor_value(row: dict[str, Any], metric: str) -> float | None:
    global_floor, personal_floor = FLOOR_COLUMNS
    value = row.get(personal_floor if metric.startswith("personal_") else global_floor) if metric.removeprefix("personal_") == "accuracy" else None
    return None if value is None or value == "" else float(value)


def _per_seed(rows: list[dict[str, Any]], variant: str, value: Any, metric: str) -> dict[int, float]:
    """seed -> ``value(row, metric)`` for the variant's runs that have one."""
    out = {int(r["seed"]): value(r, metric) for r in rows if r["variant"] == variant}
    return {seed: v for seed, v in out.items() if v is not None}


VERDICT = {
    "better": {"better": "held", "worse": "not held"},
    "worse": {"worse": "held", "better": "not held"},
    "not-worse": {"better": "held", "worse": "not held"},
}


def claim_verdicts(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (claim with a variant, setting that has it): the paired difference and its verdict."""
    out = []
    for claim in study.claims:
        if claim.variant is None:
            continue
        for setting in study.settings:
            if claim.settings and setting.name not in claim.settings or setting.name == claim.against_setting:
                continue
            other_name = claim.against_setting or setting.name
            other = next((s for s in study.settings if s.name == other_name), None)  # None: a setting left out (--settings)
            setting_rows = [r for r in rows if r["setting"] == setting.name]
            other_rows = [r for r in rows if r["setting"] == other_name]
            if claim.variant not in setting.variants or not setting_rows:
                continue
            if other is not None and claim.against != FLOOR and claim.against not in other.variants:
                continue
            metric = claim.metric or setting_rows[0]["primary_metric"]
            other_metric = claim.against_metric or metric
            mine = _per_seed(setting_rows, claim.variant, _metric_value, metric)
            if claim.against == FLOOR:
                theirs = _per_seed(other_rows, claim.variant, _floor_value, other_metric)
            else:
                theirs = _per_seed(other_rows, claim.against, _metric_value, other_metric)
            paired = paired_difference(mine, theirs, lower_is_better(metric))
            row = {"claim": claim.text, "source": claim.source, "setting": setting.name, "variant": claim.variant,
                   "against": claim.against, "metric": metric, "expect": claim.expect,
                   "against_metric": other_metric if other_metric != metric else "",
                   "against_setting": other_name if other_name != setting.name else ""}  # fmt: skip
            if paired is None:
                verdict = "not run yet" if not mine or not theirs else "no seeds in common"
                # runs there but no value of the metric: a mistyped metric, not runs still to make
                if not mine and any(r["variant"] == claim.variant for r in setting_rows):
                    verdict = f"no {metric} in the runs"
                elif not theirs and claim.against != FLOOR and any(r["variant"] == claim.against for r in other_rows):
                    verdict = f"no {other_metric} in the runs"
                out.append({**row, "seeds": 0, "mean": None, "low": None, "high": None, "verdict": verdict})
                continue
            verdict = VERDICT[claim.expect].get(paired.verdict, paired.verdict)
            low, high = (None, None) if math.isnan(paired.low) else (paired.low, paired.high)
            out.append({**row, "seeds": paired.seeds, "mean": paired.mean, "low": low, "high": high, "verdict": verdict})
    return out


def _claim_lines(study: Study, verdicts: list[dict[str, Any]]) -> list[str]:
    lines = ["## Claims", ""]
    untested = [c.text + (f" ({c.source})" if c.source else "") for c in study.claims if c.variant is None]
    if verdicts:
        lines += [
            "Each claim as a paired difference (variant minus what it is compared with, same seed; mean and 95 % t interval): "
            "held or not held when the interval excludes zero in one direction, not distinguishable when it straddles zero.",
            "",
            "| claim | source | setting | comparison | metric | seeds | difference | 95 % interval | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for v in verdicts:
            mean = "–" if v["mean"] is None else f"{v['mean']:+.4f}"
            interval = "–" if v["low"] is None else f"[{v['low']:+.4f}, {v['high']:+.4f}]"
            elsewhere = f" in {v['against_setting']}" if v["against_setting"] else ""
            metric = f"{v['metric']} − {v['against_metric']}" if v["against_metric"] else v["metric"]
            lines.append(
                f"| {v['claim']} | {v['source'] or '–'} | {v['setting']} | `{v['variant']}` − `{v['against']}`{elsewhere} ({v['expect']}) "
                f"| {metric} | {v['seeds']} | {mean} | {interval} | **{v['verdict']}** |"
            )
        lines.append("")
    if untested:
        lines += (["Also stated, not tested by a paired difference:", ""] if verdicts else []) + [f"- {t}" for t in untested] + [""]
    return lines


def _variant_table(study: Study, setting: Any, setting_rows: list[dict[str, Any]], metric: str, with_counts: bool) -> list[str]:
    extra_columns = [k for k in (*study.extra_metrics, *RUNTIME_COLUMNS) if any(r.get(k) is not None for r in setting_rows) and k != "client_train_state_bytes"]
    final_columns = sorted({k for r in setting_rows for k in r if k.startswith("final_") and k != f"final_{metric}" and r[k] is not None})
    similarity = [k for k in ("similarity_A", "similarity_B", "similarity_dW") if any(r.get(k) is not None for r in setting_rows)]
    federated = study.kind == "federated"  # a multi-task run sends nothing and has no clients
    header = [
        "variant", *(["runs"] if with_counts else []), f"final {metric}", f"best {metric}",
        *[c.removeprefix("final_") for c in final_columns], *extra_columns, *similarity,
        *([f"uplink to {metric} {'≤' if lower_is_better(metric) else '≥'} {study.reach:g} (MiB)"] if study.reach is not None else []),
        *(["uplink / run (MiB)", "downlink / run (MiB)", "client training memory (MiB)"] if federated else []), "wall / run (s)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in setting.variants:
        vr = [r for r in setting_rows if r["variant"] == variant]
        if not vr:
            continue
        cells = [variant, *([str(len(vr))] if with_counts else []), fmt([r["final"] for r in vr]), fmt([r["best"] for r in vr])]
        cells += [fmt([r.get(c) for r in vr]) for c in final_columns]
        cells += [_extra_cell([r.get(c) for r in vr], c) for c in extra_columns]
        cells += [fmt([r.get(c) for r in vr], digits=3) for c in similarity]
        if study.reach is not None:
            reached = [r["bytes_up_to_reach"] for r in vr if r.get("bytes_up_to_reach") not in (None, "")]
            cell = fmt(reached, 2**-20, 2) if reached else "not reached"
            cells.append(cell + (f" ({len(reached)} of {len(vr)} runs)" if reached and len(reached) < len(vr) else ""))
        if federated:
            cells += [fmt([r["total_bytes_up"] for r in vr], 2**-20, 2), fmt([r["total_bytes_down"] for r in vr], 2**-20, 2)]
            cells += [fmt([r.get("client_train_state_bytes") for r in vr], 2**-20, 1)]
        cells.append(fmt([r["wall_seconds"] for r in vr], digits=0))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
