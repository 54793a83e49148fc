"""Which version of the merged base weights each client holds (FLoRA, FedEx-LoRA).

Methods that merge every round's aggregate into the frozen target weights must bring each
client's copy of W up to date. A client that took part in the last aggregation holds the W
before it and needs only that round's update; one that missed rounds needs the dense W. The
server keeps, as bookkeeping tensors, the round counter and each client's last synchronised
round, so the choice is a pure function of the server state (and survives a checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.methods.base import ClientUpload, FederatedMethod, Placement
from fedtune.state import ROLE_BASE, ROLE_HEAD, State, role_of


class HoldsMergedWeights(FederatedMethod):
    """Where the keys of a merging method live: the head as the run says, each client's copy
    of the merged W local and never trained, the LoRA factors shared."""

    binds_base_weights = True
    export_format = "merged"  # the result lives in the base weights

    def placement(self, key: str) -> Placement:
        role = role_of(key)
        if role == ROLE_HEAD:
            return self.head
        return "local" if role == ROLE_BASE else "shared"

    def trains(self, key: str) -> bool:
        return role_of(key) != ROLE_BASE and self.placement(key) != "frozen"


class WeightSync:
    def __init__(self, prefix: str) -> None:
        self.round_key, self.synced_key = f"_{prefix}.round", f"_{prefix}.synced"

    def init(self, server: State, clients: int) -> State:
        server[self.round_key] = torch.tensor(0)
        server[self.synced_key] = torch.zeros(clients, dtype=torch.int64)
        return server

    def behind(self, server: State, client_id: int) -> int:
        """Aggregations since client ``client_id``'s W: 0 current, 1 the last update, more: dense W."""
        return int(server[self.round_key]) - int(server[self.synced_key][client_id])

    def advance(self, server: State, new: State, uploads: Sequence[ClientUpload]) -> State:
        """After an aggregation: each uploader holds the W before it (one update behind now)."""
        synced = server[self.synced_key].clone()
        for u in uploads:
            synced[u.client_id] = int(server[self.round_key])
        new[self.synced_key] = synced
        new[self.round_key] = server[self.round_key] + 1
        return new
