"""Analysis of trained LoRA adapters: where they point and how far they moved.

    similarity.py   φ, the LoRA paper's normalised subspace similarity of A, B and ΔW
    change.py       DoRA-style magnitude / direction change against the initial value
    runs.py         reading a run directory's adapters and initial states
    report.py       CSV, summary.json, PNG heatmaps and bar plots, the printed table

:func:`analyze` runs every comparison one run directory supports (``fedtune analyze``):

- ``clients``: every pair of personal adapters of the run (methods with local parts);
- ``initial``: every adapter (global and personal) against the state it started from;
- ``against``: with a second run, global vs global and every client of one vs every client of
  the other (when both have personal adapters); the runs must share modules and layer shapes.

Change (ΔM, ΔD) is measured for every adapter against its initial state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from fedtune.analysis.change import ChangeRow, adapter_change, column_change, delta_w_change
from fedtune.analysis.runs import GLOBAL, Adapter, Run, check_comparable, load_run
from fedtune.analysis.similarity import (
    BasisCache,
    Side,
    SimilarityRow,
    a_similarity,
    b_similarity,
    basis_similarity,
    delta_w_basis,
    similarity_rows,
    subspace_basis,
    subspace_similarity,
)

__all__ = [
    "GLOBAL",
    "Adapter",
    "Analysis",
    "ChangeRow",
    "Run",
    "SimilarityRow",
    "a_similarity",
    "analyze",
    "b_similarity",
    "basis_similarity",
    "column_change",
    "delta_w_basis",
    "delta_w_change",
    "load_run",
    "subspace_basis",
    "subspace_similarity",
]


@dataclass(frozen=True)
class Analysis:
    """Every number of one analysis, before it is written anywhere."""

    run: Run
    against: Run | None
    similarity: list[SimilarityRow]
    change: list[ChangeRow]
    top_i: int | None
    top_j: int | None
    dw_side: Side


def analyze(
    run_dir: Path | str,
    against: Path | str | None = None,
    top_i: int | None = None,
    top_j: int | None = None,
    dw_side: Side = "column",
) -> Analysis:
    """Load ``run_dir`` (and ``against``) and compute all similarity and change rows.

    ``top_i`` / ``top_j``: singular vectors kept on the left / right of each pair (default:
    all, i.e. the numerical rank); ``dw_side``: compare ΔW's column or row spaces.
    """
    run = load_run(run_dir)
    other = load_run(against, with_initial=False) if against is not None else None
    cache = BasisCache(dw_side)
    initial_pairs = [(adapter, run.initial[adapter.label]) for adapter in run.adapters]
    rows = similarity_rows(itertools.combinations(run.clients, 2), "clients", top_i, top_j, cache)
    rows += similarity_rows(initial_pairs, "initial", top_i, top_j, cache)
    if other is not None:
        check_comparable(run, other)
        pairs = [(run.global_adapter, other.global_adapter), *itertools.product(run.clients, other.clients)]
        rows += similarity_rows(pairs, "against", top_i, top_j, cache)
    change = [row for adapter, initial in initial_pairs for row in adapter_change(adapter, initial)]
    return Analysis(run, other, rows, change, top_i, top_j, dw_side)
