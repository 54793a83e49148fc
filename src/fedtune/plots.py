"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path, primary: str, title: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (rounds, values) in numeric_series(rows).items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(rounds, values, marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_title(f"{title} {name}".strip())
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}_vs_round.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    points = [(row.get("cumulative_bytes_up"), row.get(primary)) for row in rows]
    points = [(x, y) for x, y in points if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([x / 2**20 for x, _ in points], [y for _, y in points], marker="o")
        ax.set_xlabel("cumulative uplink (MiB)")
        ax.set_ylabel(primary)
        ax.set_title(f"{title} {primary} vs uplink".strip())
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{primary}_vs_uplink_bytes.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
