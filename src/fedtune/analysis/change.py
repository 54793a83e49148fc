"""How far a LoRA factor moved from its initial value, split into magnitude and direction.

Column-wise, as DoRA (Liu et al., 2024, §3) decomposes a weight: for W_t and its initial W_0
with columns n = 1..N,

    ΔM = mean_n | ‖W_t[:, n]‖ − ‖W_0[:, n]‖ |        (magnitude change, in weight units)
    ΔD = mean_n ( 1 − cos(W_t[:, n], W_0[:, n]) )     (direction change, in [0, 2])

Columns are those of the matrix as stored: A (r × d_in) has d_in columns of length r, B
(d_out × r) has r columns of length d_out, ΔW = s·B·A has d_in columns of length d_out.

The cosine of a zero column is undefined. Such columns (zero in W_0 *or* in W_t) are left out
of ΔD, whose mean runs over the remaining ``direction_columns`` of ``columns``; ΔD is NaN when
none remain. This is the normal case for B and ΔW, which start at exactly 0: their ΔD is NaN
and their ΔM is simply the mean column norm reached. ΔM is always defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.analysis.runs import Adapter


@dataclass(frozen=True)
class ColumnChange:
    """ΔM and ΔD of one matrix (see the module docstring), with the columns ΔD averages over."""

    magnitude: float
    direction: float
    direction_columns: int
    columns: int


def _from_column_stats(norm_t: torch.Tensor, norm_0: torch.Tensor, dot: torch.Tensor) -> ColumnChange:
    """ΔM and ΔD from per-column norms of W_t and W_0 and their per-column inner products."""
    magnitude = float((norm_t - norm_0).abs().mean()) if norm_t.numel() else math.nan
    defined = (norm_t > 0) & (norm_0 > 0)
    count = int(defined.sum())
    if count == 0:
        direction = math.nan
    else:
        cos = (dot[defined] / (norm_t[defined] * norm_0[defined])).clamp(-1.0, 1.0)
        direction = float((1.0 - cos).mean())
    return ColumnChange(magnitude, direction, count, int(norm_t.numel()))


def column_change(current: torch.Tensor, initial: torch.Tensor) -> ColumnChange:
    """ΔM and ΔD of ``current`` against ``initial`` (same shape), column-wise, in float64."""
    if current.shape != initial.shape or current.dim() != 2:
        raise ValueError(f"expected two matrices of one shape, got {tuple(current.shape)} and {tuple(initial.shape)}")
    w_t = current.detach().to("cpu", torch.float64)
    w_0 = initial.detach().to("cpu", torch.float64)
    return _from_column_stats(w_t.norm(dim=0), w_0.norm(dim=0), (w_t * w_0).sum(dim=0))


def delta_w_change(
    a_t: torch.Tensor, b_t: torch.Tensor, scale_t: float, a_0: torch.Tensor, b_0: torch.Tensor, scale_0: float
) -> ColumnChange:
    """:func:`column_change` of ΔW_t = s_t·B_t·A_t against ΔW_0 = s_0·B_0·A_0, from the factors.

    Column n of ΔW is s·B·a_n (a_n = A[:, n]), so its norm² is s²·a_nᵀ(BᵀB)a_n and the inner
    product of two such columns is s_t·s_0·a_t,nᵀ(B_tᵀB_0)a_0,n: r × r Gram matrices instead
    of d_out × d_in products.
    """
    if a_t.shape[1] != a_0.shape[1] or b_t.shape[0] != b_0.shape[0]:
        raise ValueError("ΔW_t and ΔW_0 must have the same shape")
    a_t, b_t, a_0, b_0 = (m.detach().to("cpu", torch.float64) for m in (a_t, b_t, a_0, b_0))

    def column_products(a_x: torch.Tensor, b_x: torch.Tensor, a_y: torch.Tensor, b_y: torch.Tensor) -> torch.Tensor:
        return ((b_x.T @ b_y) @ a_y * a_x).sum(dim=0)

    # rounding can push a zero norm² slightly negative
    norm_t = (scale_t**2 * column_products(a_t, b_t, a_t, b_t)).clamp_min(0).sqrt()
    norm_0 = (scale_0**2 * column_products(a_0, b_0, a_0, b_0)).clamp_min(0).sqrt()
    dot = scale_t * scale_0 * column_products(a_t, b_t, a_0, b_0)
    return _from_column_stats(norm_t, norm_0, dot)


@dataclass(frozen=True)
class ChangeRow:
    """One line of ``change.csv``: how ``matrix`` of ``module`` in adapter ``client`` moved from its init."""

    client: str
    module: str
    matrix: str
    magnitude: float
    direction: float
    direction_columns: int
    columns: int


def adapter_change(adapter: Adapter, initial: Adapter) -> list[ChangeRow]:
    """ΔM / ΔD of A, B and ΔW for every module of ``adapter`` against ``initial``."""
    rows = []
    for module, (a_t, b_t) in adapter.factors.items():
        a_0, b_0 = initial.factors[module]
        changes = {
            "A": column_change(a_t, a_0),
            "B": column_change(b_t, b_0),
            "dW": delta_w_change(a_t, b_t, adapter.scale[module], a_0, b_0, initial.scale[module]),
        }
        for matrix, c in changes.items():
            rows.append(ChangeRow(adapter.label, module, matrix, c.magnitude, c.direction, c.direction_columns, c.columns))
    return rows
