"""Writing an :class:`~fedtune.analysis.Analysis`: CSVs, summary.json, PNGs, a printed table.

Files (all replaced on every analysis; they are derived from the run):

    similarity.csv        kind, left, right, module, matrix (A|B|dW), phi — every number
    similarity_mean.csv   the same per pair, averaged over modules (NaN modules skipped)
    change.csv            client, module, matrix, magnitude, direction, direction_columns, columns
    change_mean.csv       the same per adapter, averaged over modules
    summary.json          means over pairs and modules, split by global adapter vs clients
    similarity_{A,B,dW}.png   client × client heatmaps of module-mean φ (two or more clients)
    against_{A,B,dW}.png      this run's clients × the other run's clients (with --against)
    change.png            ΔM and ΔD of A vs B per module, averaged over the clients

Means skip NaN entries (φ with a zero matrix, ΔD with no defined column) and count them as
``undefined``; a mean with nothing defined is NaN (``null`` in JSON). In CSVs NaN is ``nan``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedtune.analysis import Analysis  # noqa: E402
from fedtune.analysis.change import ChangeRow  # noqa: E402
from fedtune.analysis.runs import GLOBAL  # noqa: E402
from fedtune.analysis.similarity import MATRICES, SimilarityRow  # noqa: E402

SCOPES = ("clients", GLOBAL)  # summary means are over the personal adapters, or the global one
PAIR_FIELDS = ("kind", "left", "right", "matrix", "phi", "modules", "undefined")
CHANGE_MEAN_FIELDS = ("client", "matrix", "magnitude", "direction", "direction_modules", "undefined")


def _scope(label: str) -> str:
    return GLOBAL if label == GLOBAL else "clients"


def _mean(values: Iterable[float]) -> tuple[float, int, int]:
    """(mean of the finite values, how many were finite, how many were NaN)."""
    values = list(values)
    finite = [v for v in values if not math.isnan(v)]
    return (sum(finite) / len(finite) if finite else math.nan), len(finite), len(values) - len(finite)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- aggregation -----------------------------------------------------------------------------
def pair_means(rows: Sequence[SimilarityRow]) -> list[dict[str, Any]]:
    """φ per (kind, left, right, matrix), averaged over modules."""
    groups: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row.kind, row.left, row.right, row.matrix)].append(row.phi)
    out = []
    for (kind, left, right, matrix), phis in groups.items():
        mean, defined, undefined = _mean(phis)
        out.append(dict(zip(PAIR_FIELDS, (kind, left, right, matrix, mean, defined, undefined))))
    return out


def change_means(rows: Sequence[ChangeRow]) -> list[dict[str, Any]]:
    """ΔM and ΔD per (adapter, matrix), averaged over modules."""
    groups: dict[tuple[str, str], list[ChangeRow]] = defaultdict(list)
    for row in rows:
        groups[(row.client, row.matrix)].append(row)
    out = []
    for (client, matrix), group in groups.items():
        magnitude, _, _ = _mean(r.magnitude for r in group)
        direction, defined, undefined = _mean(r.direction for r in group)
        out.append(dict(zip(CHANGE_MEAN_FIELDS, (client, matrix, magnitude, direction, defined, undefined))))
    return out


def _similarity_block(rows: Sequence[SimilarityRow]) -> dict[str, Any]:
    block: dict[str, Any] = {"pairs": len({(r.left, r.right) for r in rows}), "undefined": {}}
    for matrix in MATRICES:
        block[matrix], _, block["undefined"][matrix] = _mean(r.phi for r in rows if r.matrix == matrix)
    return block


def summarize(analysis: Analysis) -> dict[str, Any]:
    """The means ``summary.json`` holds (module-level values averaged over pairs and modules).

    ``similarity.clients``: mean φ over pairs of personal adapters. ``similarity.initial`` and
    ``change``: each adapter against its own initial state, split into the ``global`` adapter
    and the ``clients``' personal ones. ``similarity.against``: the same split, against the
    other run. A block is absent when the run has nothing to compare in it.
    """
    run = analysis.run
    similarity: dict[str, Any] = {}
    by_kind: dict[str, list[SimilarityRow]] = defaultdict(list)
    for row in analysis.similarity:
        by_kind[row.kind].append(row)
    if by_kind["clients"]:
        similarity["clients"] = _similarity_block(by_kind["clients"])
    for kind in ("initial", "against"):
        split = {scope: [r for r in by_kind[kind] if _scope(r.left) == scope] for scope in SCOPES}
        if by_kind[kind]:
            similarity[kind] = {scope: _similarity_block(rows) for scope, rows in split.items() if rows}
    change: dict[str, Any] = {}
    for scope in SCOPES:
        scoped = [r for r in analysis.change if _scope(r.client) == scope]
        if not scoped:
            continue
        change[scope] = {}
        for matrix in MATRICES:
            of_matrix = [r for r in scoped if r.matrix == matrix]
            magnitude, _, _ = _mean(r.magnitude for r in of_matrix)
            direction, _, undefined = _mean(r.direction for r in of_matrix)
            change[scope][matrix] = {"magnitude": magnitude, "direction": direction, "direction_undefined": undefined}
    return {
        "run": str(run.path),
        "against": str(analysis.against.path) if analysis.against else None,
        "modules": len(run.modules),
        "clients": len(run.clients),
        "against_clients": len(analysis.against.clients) if analysis.against else None,
        "top_i": analysis.top_i,
        "top_j": analysis.top_j,
        "dw_side": analysis.dw_side,
        "similarity": similarity,
        "change": change,
    }


# -- files -----------------------------------------------------------------------------------
def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(analysis: Analysis, out: Path) -> list[Path]:
    """Write every file listed in the module docstring into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    sim_fields = [f.name for f in dataclasses.fields(SimilarityRow)]
    change_fields = [f.name for f in dataclasses.fields(ChangeRow)]
    summary = summarize(analysis)
    written = [
        _write_csv(out / "similarity.csv", [dataclasses.asdict(r) for r in analysis.similarity], sim_fields),
        _write_csv(out / "similarity_mean.csv", pair_means(analysis.similarity), PAIR_FIELDS),
        _write_csv(out / "change.csv", [dataclasses.asdict(r) for r in analysis.change], change_fields),
        _write_csv(out / "change_mean.csv", change_means(analysis.change), CHANGE_MEAN_FIELDS),
    ]
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    written.append(out / "summary.json")
    written += _plot_heatmaps(analysis, out)
    written.append(_plot_change(analysis, out / "change.png"))
    return written


# -- plots -----------------------------------------------------------------------------------
def pair_matrix(rows: Sequence[SimilarityRow], kind: str, matrix: str, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
    """Module-mean φ as a len(left) × len(right) array; symmetric fill for ``clients`` pairs.

    For ``clients`` the diagonal is 1 (an adapter against itself, by definition of φ).
    """
    index_l, index_r = {k: n for n, k in enumerate(left)}, {k: n for n, k in enumerate(right)}
    grid = np.full((len(left), len(right)), np.nan)
    for pair in pair_means([r for r in rows if r.kind == kind and r.matrix == matrix]):
        if pair["left"] in index_l and pair["right"] in index_r:
            grid[index_l[pair["left"]], index_r[pair["right"]]] = pair["phi"]
            if kind == "clients":
                grid[index_r[pair["right"]], index_l[pair["left"]]] = pair["phi"]
    if kind == "clients":
        np.fill_diagonal(grid, 1.0)
    return grid


def heatmap(
    grid: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str, ylabel: str, path: Path
) -> Path:
    size = max(3.5, 0.4 * max(len(rows), len(cols)) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="φ (mean over modules)")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 12 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid.size <= 144:  # print the numbers while they still fit
        for (y, x), value in np.ndenumerate(grid):
            colour = "k" if value > 0.6 else "w"  # readable on viridis' light and dark ends
            ax.text(x, y, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_heatmaps(analysis: Analysis, out: Path) -> list[Path]:
    written = []
    clients = [c.label for c in analysis.run.clients]
    names = {"A": "A (row space)", "B": "B (column space)", "dW": f"ΔW ({analysis.dw_side} space)"}
    for matrix in MATRICES:
        if len(clients) >= 2:
            grid = pair_matrix(analysis.similarity, "clients", matrix, clients, clients)
            title = f"similarity of {names[matrix]}"
            written.append(heatmap(grid, clients, clients, title, "client", "client", out / f"similarity_{matrix}.png"))
        other = [c.label for c in analysis.against.clients] if analysis.against else []
        if clients and other:
            grid = pair_matrix(analysis.similarity, "against", matrix, clients, other)
            title = f"{names[matrix]} vs {analysis.against.path.name}"  # type: ignore[union-attr]
            path = out / f"against_{matrix}.png"
            written.append(heatmap(grid, clients, other, title, "client (other run)", "client (this run)", path))
    return written


def _short_names(modules: Sequence[str]) -> list[str]:
    prefix = os.path.commonprefix(list(modules)) if len(modules) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]  # cut at a dot, not inside a name
    return [m[len(prefix) :] or m for m in modules]


def _plot_change(analysis: Analysis, path: Path) -> Path:
    """Bars per module: ΔM (left) and ΔD (right) of A vs B, averaged over the clients (or global)."""
    subjects = {c.label for c in analysis.run.clients} or {GLOBAL}
    modules = analysis.run.modules
    rows = [r for r in analysis.change if r.client in subjects]
    x = np.arange(len(modules))
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 0.6 * len(modules) + 3), 4))
    metrics: dict[str, Callable[[ChangeRow], float]] = {
        "magnitude ΔM": lambda r: r.magnitude,
        "direction ΔD": lambda r: r.direction,
    }
    for ax, (label, value) in zip(axes, metrics.items()):
        for offset, matrix in ((-0.2, "A"), (0.2, "B")):
            heights = [_mean(value(r) for r in rows if r.module == m and r.matrix == matrix)[0] for m in modules]
            bars = ax.bar(x + offset, np.nan_to_num(heights, nan=0.0), width=0.4, label=matrix)
            for bar, height in zip(bars, heights):
                if math.isnan(height):  # e.g. ΔD of B from its zero init: say so instead of a zero bar
                    ax.text(bar.get_x() + bar.get_width() / 2, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, _short_names(modules), rotation=90, fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs init ({'clients' if GLOBAL not in subjects else 'global'} mean)")
        ax.legend(fontsize=8, framealpha=0.7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- printed table ---------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "     –" if value is None or math.isnan(value) else f"{value:6.3f}"


def format_means(summary: dict[str, Any]) -> str:
    """A short table of the summary's means (the CLI prints it)."""
    lines = [f"modules {summary['modules']}, clients {summary['clients']}", "", f"{'mean φ':<28}{'A':>7}{'B':>7}{'dW':>7}"]
    sim = summary["similarity"]
    entries: list[tuple[str, dict[str, Any]]] = []
    if "clients" in sim:
        entries.append((f"client pairs ({sim['clients']['pairs']})", sim["clients"]))
    for kind, name in (("initial", "vs initial"), ("against", "vs other run")):
        for scope, block in sim.get(kind, {}).items():
            entries.append((f"{name}: {scope} ({block['pairs']})", block))
    lines += [f"{name:<28}" + "".join(f" {_fmt(block[m])}" for m in MATRICES) for name, block in entries]
    lines += ["", f"{'change vs initial':<28}{'ΔM':>7}{'ΔD':>7}"]
    for scope, per_matrix in summary["change"].items():
        for matrix, c in per_matrix.items():
            lines.append(f"{scope + ' ' + matrix:<28} {_fmt(c['magnitude'])} {_fmt(c['direction'])}")
    return "\n".join(lines)
