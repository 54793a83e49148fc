"""A study's Markdown report: mean +- std tables per setting, and plots across seeds."""

from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.atomic import write_text
from fedtune.plots import line_plot
from fedtune.rundir import read_metrics
from fedtune.studies.definitions import Study
from fedtune.studies.runner import RUNTIME_COLUMNS


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


def _extra_cell(values: list[Any], column: str) -> str:
    if column.endswith("_bytes"):
        return fmt(values, 2**-20, 1) + " MiB"
    if column == "train_tokens_per_second":
        return fmt(values, digits=0)
    return fmt(values)


def write_report(
    study: Study,
    rows: list[dict[str, Any]],
    report_dir: Path,
    size: str,
    seeds: list[int],
    wall_seconds: float,
    command: str,
    skipped: Sequence[str] = (),
    missing: Sequence[str] = (),
) -> Path:
    figures = report_dir / study.name
    lines = [
        f"# Study `{study.name}`",
        "",
        study.question,
        "",
        f"- Size: **{size}** ({'about 2 h on 2 CPU cores' if size == 'cpu' else 'GPU budget'}); seeds {seeds}.",
        f"- Report written on: {hardware()}.",
        f"- Runs' device (from their summaries): {', '.join(sorted({str(r.get('device')) for r in rows}))}.",
        f"- Wall time of the runs: {wall_seconds / 60:.1f} min, summed over runs (runs reused from an earlier invocation count their own time; runs made with `--jobs` overlap).",
        f"- Reproduce: `{command}`; every run directory is listed in `{study.name}.csv`.",
        "",
    ]
    if skipped:
        lines += [f"**Partial report**: the settings {', '.join(skipped)} of this study were not run for it.", ""]
    if missing:
        lines += [f"**Partial report**: {len(rows)} of {len(rows) + len(missing)} runs finished; not finished: {'; '.join(missing)}.", ""]
    for setting in study.settings:
        setting_rows = [r for r in rows if r["setting"] == setting.name]
        if not setting_rows:
            continue
        metric = setting_rows[0]["primary_metric"]
        extra_columns = [k for k in (*study.extra_metrics, *RUNTIME_COLUMNS) if any(r.get(k) is not None for r in setting_rows)]
        final_columns = sorted({k for r in setting_rows for k in r if k.startswith("final_") and k != f"final_{metric}"})
        similarity = [k for k in ("similarity_A", "similarity_B", "similarity_dW") if any(r.get(k) is not None for r in setting_rows)]
        header = ["variant", *(["runs"] if missing else []), f"final {metric}", f"best {metric}", *[c.removeprefix("final_") for c in final_columns], *extra_columns, *similarity, "uplink / run (MiB)", "wall / run (s)"]
        lines += [f"## {setting.name}", "", f"Base config `{setting.base}` with the `{size}` overrides {setting.overrides[size]}.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for variant in setting.variants:
            vr = [r for r in setting_rows if r["variant"] == variant]
            if not vr:
                continue
            cells = [variant, *([str(len(vr))] if missing else []), fmt([r["final"] for r in vr]), fmt([r["best"] for r in vr])]
            cells += [fmt([r.get(c) for r in vr]) for c in final_columns]
            cells += [_extra_cell([r.get(c) for r in vr], c) for c in extra_columns]
            cells += [fmt([r.get(c) for r in vr], digits=3) for c in similarity]
            cells += [fmt([r["total_bytes_up"] for r in vr], 2**-20, 2), fmt([r["wall_seconds"] for r in vr], digits=0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if not study.analyze:
            for path in plot_setting(setting_rows, metric, figures, setting.name):
                lines.append(f"![{path.stem}]({study.name}/{path.name})")
            lines.append("")
    if study.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in study.notes] + [""]
    lines += ["## Claims under test", ""] + [f"- {claim}" for claim in study.claims] + [""]
    lines += ["What the tables above show for each claim is summarised in the project README (Results).", ""]
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"{study.name}.md"
    write_text(path, "\n".join(lines))
    return path
