"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedtune.atomic import savefig  # noqa: E402

#: per-round fields that are bookkeeping, not metrics
NOT_METRICS = {"round", "num_examples", "replies", "dp_delta", "dp_noise_std"}


def numeric_series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """metric name -> (rounds, values) for every numeric per-round field."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            bookkeeping = key.endswith(("seconds", "_bytes")) or key.startswith(("bytes", "cumulative_"))
            if key in NOT_METRICS or bookkeeping or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                rounds, values = series.setdefault(key, ([], []))
                rounds.append(int(row["round"]))
                values.append(float(value))
    return series


#: matplotlib's default cycle has ten colours; the next ten curves change marker and line style too,
#: so a study of twelve variants does not draw two of them alike
_MARKERS = ("o", "s", "^", "D")
_LINESTYLES = ("-", "--", ":", "-.")


def curve_style(index: int) -> dict[str, str]:
    """The colour, marker and line style of the ``index``-th curve of a plot (distinct up to 40 curves)."""
    cycle = (index // 10) % len(_MARKERS)
    return {"color": f"C{index % 10}", "marker": _MARKERS[cycle], "linestyle": _LINESTYLES[cycle]}


def line_plot(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    path: Path,
    title: str = "",
    figsize: tuple[float, float] = (5, 3.5),
    dpi: int = 100,
    integer_x: bool = False,
) -> Path:
    """One PNG with a line per labelled (x, y) curve; a legend when there is more than one.

    `integer_x` keeps x ticks on whole numbers (rounds), which matplotlib would otherwise put at 1.25, 1.5, ...
    """
    fig, ax = plt.subplots(figsize=figsize)
    for index, (label, (xs, ys)) in enumerate(curves.items()):
        ax.plot(xs, ys, label=label, **curve_style(index))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 6:
        # Beside the axes: inside, a long legend hides the curves it names.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def scatter_plot(
    points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, path: Path, highlight: frozenset[str] = frozenset()
) -> Path:
    """One labelled point per variant; ``highlight`` ones (the Pareto front) drawn filled."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (x, y) in points.items():
        front = label in highlight
        ax.scatter([x], [y], s=50, marker="o", facecolors="C0" if front else "none", edgecolors="C0")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(xlabel + ("  (filled: not beaten on both)" if highlight else ""))
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(axis="both", useOffset=False, style="plain")
    ax.margins(x=0.35, y=0.15)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path, primary: str, title: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        line_plot({name: (rounds, values)}, "round", name, out_dir / f"{name}_vs_round.png", f"{title} {name}".strip(), integer_x=True)
        for name, (rounds, values) in numeric_series(rows).items()
    ]
    points = [(row.get("cumulative_bytes_up"), row.get(primary)) for row in rows]
    points = [(x, y) for x, y in points if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if points:
        curve = ([x / 2**20 for x, _ in points], [y for _, y in points])
        path = out_dir / f"{primary}_vs_uplink_bytes.png"
        written.append(line_plot({primary: curve}, "cumulative uplink (MiB)", primary, path, f"{title} {primary} vs uplink".strip()))
    return written
