"""Which LoRA factors to share: FedIT, FFA-LoRA and FedSA-LoRA (homogeneous ranks).

All three are FedAvg over a subset of the LoRA factors; they differ only in where A and B
live (see ``shared/METHODS.md`` § Homogeneous rank). Fed-ALoRA, the fourth member, has
options and a heterogeneous variant of its own and lives in ``fed_alora.py``.
"""

from __future__ import annotations

from fedtune.methods.base import RoleSharingMethod
from fedtune.methods.registry import register
from fedtune.state import ROLE_A, ROLE_B


@register
class FedIT(RoleSharingMethod):
    """FedAvg on both factors: A = sum p_k A_k, B = sum p_k B_k.

    Not exact: (sum p B)(sum p A) != sum p B A, the aggregation noise that motivates the
    other methods.
    """

    name = "fedit"
    summary = "FedAvg of both LoRA factors A and B (FedIT); inexact product aggregation"
    shared_roles = frozenset({ROLE_A, ROLE_B})


@register
class FFALoRA(RoleSharingMethod):
    """Freeze A at an init shared by all clients, train and average B only.

    Aggregation is exact: s (sum p_k B_k) A = sum p_k s B_k A because A is common. The
    shared A must come from one seed on every client; the runtime guarantees it by giving
    all clients the same initial state (``lora.init_seed_mode=shared``).
    """

    name = "ffa-lora"
    summary = "FFA-LoRA: A frozen at a shared random init, only B trained and averaged (exact)"
    shared_roles = frozenset({ROLE_B})
    frozen_roles = frozenset({ROLE_A})


@register
class FedSALoRA(RoleSharingMethod):
    """Share A (general knowledge, per FedSA-LoRA), keep B on each client."""

    name = "fedsa-lora"
    summary = "FedSA-LoRA: A averaged across clients, B kept personal on each client"
    shared_roles = frozenset({ROLE_A})
    local_roles = frozenset({ROLE_B})


@register
class LocalOnly(RoleSharingMethod):
    """No federation: every client trains its own adapter and head; nothing is sent.

    The lower baseline of every study, and the setting of seed 000's initialisation
    experiment (independent adapters from the same or different init seeds).
    """

    name = "local-only"
    summary = "Baseline: each client trains its own LoRA (and head) alone; nothing is communicated"
    aggregates_by_mean = False  # nothing is aggregated
    server_opt_refusal = "nothing is aggregated"
    local_roles = frozenset({ROLE_A, ROLE_B})

    def __init__(self, head: str = "local") -> None:
        super().__init__(head="local" if head == "shared" else head)  # type: ignore[arg-type]
