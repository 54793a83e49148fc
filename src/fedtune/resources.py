"""Heterogeneous client resources: which LoRA rank each client can afford.

``ranks`` in the config is either an explicit per-client list (``ranks=[2,4,8,8]``) or
resource tiers with shares (``ranks: {4: 0.4, 8: 0.3, 16: 0.3}``), assigned to clients by the
run seed. Without ``ranks`` every client has rank ``lora.r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.errors import UsageError


def tier_counts(tiers: Mapping[int, float], clients: int) -> dict[int, int]:
    """Clients per tier: largest-remainder rounding of share x clients (sums to ``clients``)."""
    total = sum(tiers.values())
    if total <= 0:
        raise UsageError("rank tier shares must be positive")
    exact = {rank: share / total * clients for rank, share in tiers.items()}
    counts = {rank: int(np.floor(x)) for rank, x in exact.items()}
    leftovers = sorted(exact, key=lambda r: (exact[r] - counts[r], -r), reverse=True)
    for rank in leftovers[: clients - sum(counts.values())]:
        counts[rank] += 1
    return counts


def assign_ranks(ranks: Sequence[int] | Mapping[int, float] | None, clients: int, default: int, seed: int) -> list[int]:
    """The LoRA rank of every client, reproducible from ``seed``."""
    if ranks is None:
        return [default] * clients
    if isinstance(ranks, Mapping):
        counts = tier_counts(ranks, clients)
        pool = [rank for rank in sorted(counts) for _ in range(counts[rank])]
        order = np.random.default_rng(seed).permutation(clients)
        return [pool[i] for i in order]
    if len(ranks) != clients:
        raise UsageError(f"ranks lists {len(ranks)} ranks for {clients} clients")
    return [int(r) for r in ranks]


def validate_ranks(value: Any) -> Any:
    """Pydantic-side check of the ``ranks`` field's values (positivity)."""
    if value is None:
        return value
    items = value.keys() if isinstance(value, Mapping) else value
    if any(int(r) <= 0 for r in items):
        raise ValueError("every rank must be > 0")
    if isinstance(value, Mapping) and any(float(s) < 0 for s in value.values()):
        raise ValueError("tier shares must be >= 0")
    return value


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha / r (rsLoRA: alpha / sqrt(r))."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass(frozen=True)
class RankPlan:
    """What heterogeneous methods know about the federation's ranks and LoRA scales."""

    client_ranks: tuple[int, ...]
    server_rank: int
    alpha: float = 16.0
    rslora: bool = False

    def scale(self, rank: int) -> float:
        return lora_scale(self.alpha, rank, self.rslora)

    def to_client_scale(self, rank: int) -> float:
        """s(r_max) / s(r_k): multiply the server's B by this to get a rank-r_k client's B.

        A rank-r_k adapter runs at s_k = s(r_k), the server's factors at s(r_max); with
        B_k = B * s(r_max) / s(r_k) the client's s_k B_k A equals the server's s(r_max) B A,
        so the same Delta W is meant on both sides.
        """
        return self.scale(self.server_rank) / self.scale(rank)

    def to_server_scale(self, rank: int) -> float:
        """s(r_k) / s(r_max): multiply a rank-r_k client's B by this to get the server's."""
        return self.scale(rank) / self.scale(self.server_rank)

    @classmethod
    def from_config(cls, config: Any) -> RankPlan:
        return cls(tuple(config.client_ranks), config.server_rank, config.lora.alpha, config.lora.rslora)
