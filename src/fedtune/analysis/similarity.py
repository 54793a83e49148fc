"""Normalised subspace similarity between LoRA factors (Hu et al., LoRA, §7.2).

For two matrices X, Y acting on the same space, take the top-i singular vectors U_X of X and
the top-j singular vectors U_Y of Y on the same side, then

    φ(X, Y; i, j) = ‖U_Xᵀ U_Y‖_F² / min(i, j)  ∈ [0, 1]

φ = 1 when the smaller subspace lies inside the larger one, 0 when they are orthogonal. It is
the mean squared cosine of the principal angles, so it depends only on the subspaces: any
change of basis inside them (a rotation of A's rows, of B's columns) leaves φ unchanged.
Two random k-dimensional subspaces of R^d have φ ≈ k / d on average.

Which side is compared:

- ``A`` (r × d_in): its row space, the right singular vectors (what the adapter reads from
  the input);
- ``B`` (d_out × r): its column space, the left singular vectors (where it writes);
- ``dW`` = s·B·A (d_out × d_in): column space by default, row space on request.

With full-rank factors and i = j = r, col(ΔW) = col(B) and row(ΔW) = row(A), so φ_dW then
equals φ_B (or φ_A); ΔW adds information when i, j < r, where its top directions are weighted
by both factors.

Degenerate inputs are explicit rather than silent:

- i, j are clipped to the *numerical rank* of their matrix (singular values above
  ``rtol · σ_max``): singular vectors beyond the rank are an arbitrary completion, so they
  are left out and the normalisation uses the clipped sizes;
- a zero matrix (B at its zero init, hence ΔW = 0) has no subspace: φ is NaN.

All arithmetic is float64; the default ``rtol`` is ``max(m, n) · eps`` of the matrix's own
dtype (float32 for stored adapters), numpy's ``matrix_rank`` rule at the precision the values
actually carry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.analysis.runs import Adapter

Side = Literal["column", "row"]
SIDES: tuple[Side, ...] = ("column", "row")
MATRICES = ("A", "B", "dW")


def default_rtol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """``max(m, n) · eps(dtype)``: singular values below ``rtol · σ_max`` count as zero.

    ``dtype`` is the precision the values were stored in, not the float64 we compute in:
    float32 rounding noise must not count as rank.
    """
    return max(shape) * torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps


def _check_top(top: int | None) -> None:
    if top is not None and top < 1:
        raise ValueError(f"the number of singular vectors must be >= 1, got {top}")


def _keep(singular_values: torch.Tensor, top: int | None, rtol: float) -> int:
    """How many leading singular vectors to keep: at most ``top``, at most the numerical rank."""
    if singular_values.numel() == 0:
        return 0
    largest = float(singular_values[0])
    if largest == 0.0 or not math.isfinite(largest):
        return 0
    rank = int((singular_values > rtol * largest).sum())
    return rank if top is None else min(top, rank)


def subspace_basis(matrix: torch.Tensor, side: Side = "column", top: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis (float64, one vector per column) of the top singular subspace.

    ``side="column"``: left singular vectors (m × k); ``side="row"``: right singular vectors
    (n × k). k = min(top, numerical rank); k = 0 for a zero matrix. Columns are ordered by
    decreasing singular value, so ``basis[:, :i]`` is the top-i basis for any i <= k.
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    _check_top(top)
    tol = default_rtol(tuple(matrix.shape), matrix.dtype) if rtol is None else rtol
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    k = _keep(s, top, tol)
    return u[:, :k] if side == "column" else vh[:k].T


def delta_w_basis(
    a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, side: Side = "column", top: int | None = None, rtol: float | None = None
) -> torch.Tensor:
    """:func:`subspace_basis` of ΔW = scale·B·A, computed from the factors.

    Never forms the d_out × d_in product: with B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR),
    ΔW = Q_B (scale · R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small r × r core gives ΔW's singular
    values exactly and its singular vectors as Q_B U (columns) and Q_A V (rows). That keeps an
    LLM's 4096 × 11008 module as cheap as its rank-8 factors.
    """
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"B @ A needs B (d_out × r) and A (r × d_in), got {tuple(b.shape)} and {tuple(a.shape)}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    _check_top(top)
    d_out, d_in = b.shape[0], a.shape[1]
    tol = default_rtol((d_out, d_in), torch.promote_types(a.dtype, b.dtype)) if rtol is None else rtol
    q_b, r_b = torch.linalg.qr(b.detach().to("cpu", torch.float64))
    q_a, r_a = torch.linalg.qr(a.detach().to("cpu", torch.float64).T)
    u, s, vh = torch.linalg.svd(float(scale) * (r_b @ r_a.T), full_matrices=False)
    k = _keep(s, top, tol)
    return q_b @ u[:, :k] if side == "column" else q_a @ vh[:k].T


def basis_similarity(u_x: torch.Tensor, u_y: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """φ between two orthonormal bases (as from :func:`subspace_basis`) of the same space.

    Uses the first min(i, basis size) and min(j, basis size) vectors. NaN when either side
    is empty (a zero matrix has no subspace to compare).
    """
    if u_x.shape[0] != u_y.shape[0]:
        raise ValueError(f"subspaces of different spaces: R^{u_x.shape[0]} vs R^{u_y.shape[0]}")
    _check_top(i)
    _check_top(j)
    u_x = u_x[:, : u_x.shape[1] if i is None else i]
    u_y = u_y[:, : u_y.shape[1] if j is None else j]
    k = min(u_x.shape[1], u_y.shape[1])
    if k == 0:
        return math.nan
    phi = float(torch.linalg.matrix_norm(u_x.T @ u_y) ** 2) / k
    # ‖U_Xᵀ U_Y‖_F² <= min(i, j) exactly; clip the float rounding above 1 (or below 0).
    return min(1.0, max(0.0, phi))


def subspace_similarity(x: torch.Tensor, y: torch.Tensor, side: Side = "column", i: int | None = None, j: int | None = None) -> float:
    """φ(X, Y; i, j) of two matrices on ``side`` (see the module docstring). NaN if either is zero."""
    return basis_similarity(subspace_basis(x, side, i), subspace_basis(y, side, j))


def a_similarity(a_x: torch.Tensor, a_y: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """φ of two LoRA A factors (r × d_in): overlap of their row spaces in R^{d_in}."""
    return subspace_similarity(a_x, a_y, "row", i, j)


def b_similarity(b_x: torch.Tensor, b_y: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """φ of two LoRA B factors (d_out × r): overlap of their column spaces in R^{d_out}. NaN if either is 0."""
    return subspace_similarity(b_x, b_y, "column", i, j)


def lora_bases(
    a: torch.Tensor, b: torch.Tensor, scale: float, top: int | None = None, dw_side: Side = "column"
) -> dict[str, torch.Tensor]:
    """The bases φ compares for one LoRA module: ``{"A": row(A), "B": col(B), "dW": dw_side(ΔW)}``.

    Computed once per adapter and module, so comparing n adapters pairwise costs n SVDs and
    n² small products, not n² SVDs.
    """
    return {
        "A": subspace_basis(a, "row", top),
        "B": subspace_basis(b, "column", top),
        "dW": delta_w_basis(a, b, scale, dw_side, top),
    }


@dataclass(frozen=True)
class SimilarityRow:
    """One line of ``similarity.csv``: φ between ``matrix`` of ``module`` in two adapters.

    ``kind`` says which comparison: ``clients`` (two personal adapters of one run),
    ``initial`` (an adapter against the state it started from) or ``against`` (an adapter of
    this run against one of another run). ``phi`` is NaN when a side is a zero matrix.
    """

    kind: str
    left: str
    right: str
    module: str
    matrix: str
    phi: float


class BasisCache:
    """Each adapter's bases, computed once however many pairs it appears in."""

    def __init__(self, dw_side: Side = "column") -> None:
        self.dw_side = dw_side
        self._bases: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._keep_alive: list[Adapter] = []  # ids are only unique while the object lives

    def get(self, adapter: Adapter, module: str) -> dict[str, torch.Tensor]:
        key = (id(adapter), module)
        if key not in self._bases:
            a, b = adapter.factors[module]
            self._bases[key] = lora_bases(a, b, adapter.scale[module], dw_side=self.dw_side)
            self._keep_alive.append(adapter)
        return self._bases[key]


def similarity_rows(
    pairs: Iterable[tuple[Adapter, Adapter]],
    kind: str,
    i: int | None = None,
    j: int | None = None,
    cache: BasisCache | None = None,
) -> list[SimilarityRow]:
    """φ of A, B and ΔW for every module of every (left, right) pair; top-i left, top-j right."""
    cache = cache or BasisCache()
    rows = []
    for left, right in pairs:
        for module in left.modules:
            x, y = cache.get(left, module), cache.get(right, module)
            for matrix in MATRICES:
                phi = basis_similarity(x[matrix], y[matrix], i, j)
                rows.append(SimilarityRow(kind, left.label, right.label, module, matrix, phi))
    return rows
