"""What a multi-task run reports: per-task scores, their balance, router weights; table and plots.

Spread ("balanced performance") is given two ways: the population standard deviation over tasks
(``std``, ddof = 0) and the gap between the best and the worst task (``range`` = max − min).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: dataset files given as tasks are labelled by their file name in plots, not their whole path
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz")


def _label(task: str) -> str:
    return Path(task).name if task.endswith(_FILE_SUFFIXES) else task


def score_stats(scores: Mapping[str, float]) -> dict[str, float]:
    values = list(scores.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "range": max(values) - min(values), "min": min(values), "max": max(values)}


def format_table(summary: Mapping[str, Any], out: Path) -> str:
    metric = summary["score_metric"]
    router = summary["router_weights"]
    head = [
        ("variant / model", f"{summary['variant']} / {summary['model']}"),
        ("adapters x rank", f"{summary['num_adapters']} x r={summary['r']} (routing {summary['routing']})"),
        ("trainable params", f"{summary['params']['trainable']:,} (adapters {summary['params']['adapters']:,})"),
        ("steps", str(summary["steps"])),
    ]
    width = max([len(k) for k, _ in head] + [len(t) for t in summary["scores"]] + [len("mean")])
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    lines.append("")
    initial = summary.get("initial_scores") or {}  # eval_initial: the base model's scores beside the trained ones
    base = {task: f"  {value:>9.4f}" for task, value in initial.items()}
    if initial:
        base["mean"] = f"  {statistics.fmean(initial.values()):>9.4f}"
    lines.append(f"{'task':<{width}}  {metric:>10}{'  untrained' if initial else ''}  router weights (per adapter)")
    for task, score in summary["scores"].items():
        weights = " ".join(f"{w:.2f}" for w in router.get(task, []))
        lines.append(f"{task:<{width}}  {score:>10.4f}{base.get(task, '')}  {weights}")
    lines.append(f"{'mean':<{width}}  {summary['mean']:>10.4f}{base.get('mean', '')}")
    lines.append(f"{'std / range':<{width}}  {summary['spread']['std']:>10.4f}  range {summary['spread']['range']:.4f}")
    lines.append("")
    lines.append(f"{'wall time':<{width}}  {summary['wall_seconds']:.1f} s")
    lines.append(f"{'run directory':<{width}}  {out}")
    return "\n".join(lines)


def plot_task_scores(scores: Mapping[str, float], metric: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(scores) + 1.5), 3.5))
    names = list(scores)
    bars = ax.bar(range(len(names)), [scores[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    mean = sum(scores.values()) / len(scores)
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_router_heatmap(weights: Mapping[str, Sequence[float]], title: str, path: Path) -> None:
    tasks = list(weights)
    matrix = [list(weights[t]) for t in tasks]
    num_adapters = len(matrix[0]) if matrix else 0
    fig, ax = plt.subplots(figsize=(max(3.5, 0.7 * num_adapters + 2.5), max(2.5, 0.45 * len(tasks) + 1.2)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(num_adapters), [str(j) for j in range(num_adapters)])
    ax.set_yticks(range(len(tasks)), [_label(t) for t in tasks], fontsize=8)
    ax.set_xlabel("adapter")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean routing weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores_over_steps(rows: Sequence[Mapping[str, Any]], metric: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [row["step"] for row in rows]
    for task in rows[-1]["scores"]:
        ax.plot(steps, [row["scores"][task] for row in rows], marker="o", label=_label(task))
    ax.plot(steps, [row["mean"] for row in rows], color="black", linestyle="--", label="mean")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{summary['variant']} (N={summary['num_adapters']}, r={summary['r']})"
    written = [out_dir / "task_scores.png", out_dir / "router_weights.png"]
    plot_task_scores(summary["scores"], summary["score_metric"], title, written[0])
    plot_router_heatmap(summary["router_weights"], f"{title}: router weight per task", written[1])
    if len(rows) > 1:
        written.append(out_dir / "scores_vs_step.png")
        plot_scores_over_steps(rows, summary["score_metric"], title, written[-1])
    return written
