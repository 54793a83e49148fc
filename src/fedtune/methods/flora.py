"""FLoRA (Wang et al. NeurIPS 2024): stacking aggregation, merged into the base weights.

Stacking A = [p_1 A_1; ...; p_K A_K] and B = [s_1 B_1, ..., s_K B_K] gives
B A = sum_k p_k s_k B_k A_k exactly, whatever the ranks. The server merges that into each
target module's weight, W <- W + B A, and every client starts a fresh LoRA next round.

What a client downloads is what it needs to bring its own copy of W up to date: the last
round's stack if it was synchronised one aggregation ago (so the download grows with the
number of clients, FLoRA's known cost), or the dense merged weights if it missed rounds
(partial participation). The server keeps, as bookkeeping tensors, the round counter, each
client's last synchronised round and the last stack. Clients keep their W locally.

Server and clients must hold the same W bit for bit, round after round. So with a bf16 or
fp16 wire the server rounds the stack to the wire dtype *before* merging it (the clients
merge exactly those rounded values, with the same float ops), and dense W always travels
in full precision (``fedtune.state.travels_exact``). The scales s_k are folded into the
stack, so each client's Delta W enters W as it trained it, whatever its rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.methods.base import ClientUpload, HeadPlacement, data_weights
from fedtune.methods.registry import register
from fedtune.methods.weight_sync import HoldsMergedWeights, WeightSync
from fedtune.resources import RankPlan
from fedtune.state import (
    BASE_SUFFIX,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    ROLE_A,
    ROLE_B,
    ROLE_BASE,
    ROLE_HEAD,
    WIRE_DTYPES,
    State,
    clone,
    lora_modules,
    role_of,
    through_wire,
    weighted_average,
)

SYNC = WeightSync("flora")  # bookkeeping keys _flora.round, _flora.synced
STACK_PREFIX = "_flora.stack."


def stack(uploads: Sequence[ClientUpload], plan: RankPlan) -> State:
    """Per module: A = [p_k A_k] stacked by rows, B = [s_k B_k] stacked by columns."""
    p = data_weights(uploads)
    stacked: State = {}
    for module in lora_modules(uploads[0].tensors):
        a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
        stacked[a_key] = torch.cat([p_k * u.tensors[a_key] for p_k, u in zip(p, uploads)], dim=0)
        stacked[b_key] = torch.cat(
            [plan.scale(u.tensors[a_key].shape[0]) * u.tensors[b_key] for u in uploads], dim=1
        )
    return stacked


def merge(weights: State, stacked: State) -> State:
    """W <- W + B A for every module of the stack (the same float ops on server and clients)."""
    merged = dict(weights)
    for module in lora_modules(stacked):
        key = module + BASE_SUFFIX
        merged[key] = weights[key] + stacked[module + LORA_B_SUFFIX] @ stacked[module + LORA_A_SUFFIX]
    return merged


@register
class FLoRA(HoldsMergedWeights):
    name = "flora"
    summary = "FLoRA: exact stacking aggregation merged into the base weights; fresh LoRA each round"
    supports_heterogeneous_ranks = True
    server_opt_refusal = "each round's stack is merged into the base weights and the LoRA restarts: there is no averaged tensor to move"

    def __init__(self, plan: RankPlan, head: HeadPlacement = "shared", wire_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(head=head)
        self.plan = plan
        self.wire_dtype = wire_dtype

    @classmethod
    def from_config(cls, config: Any) -> FLoRA:
        return cls(RankPlan.from_config(config), config.head, WIRE_DTYPES[config.wire_dtype])

    def server_init(self, initial: State) -> State:
        server = clone({k: v for k, v in initial.items() if role_of(k) in (ROLE_BASE, ROLE_HEAD)})
        if self.head != "shared":
            server = {k: v for k, v in server.items() if role_of(k) == ROLE_BASE}
        return SYNC.init(server, len(self.plan.client_ranks))

    def download(self, server: State, client_id: int) -> State:
        payload = {k: v for k, v in server.items() if role_of(k) == ROLE_HEAD and self.is_shared(k) and not k.startswith("_")}
        behind = SYNC.behind(server, client_id)
        if behind == 1:
            payload.update({k[len(STACK_PREFIX) :]: v for k, v in server.items() if k.startswith(STACK_PREFIX)})
        elif behind > 1:
            payload.update({k: v for k, v in server.items() if role_of(k) == ROLE_BASE})
        return payload

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        weights = {k: v for k, v in (local or initial).items() if role_of(k) == ROLE_BASE}
        if any(role_of(k) == ROLE_BASE for k in received):
            weights = {k: v for k, v in received.items() if role_of(k) == ROLE_BASE}
        elif any(role_of(k) in (ROLE_A, ROLE_B) for k in received):
            weights = merge(weights, {k: v for k, v in received.items() if role_of(k) in (ROLE_A, ROLE_B)})
        start = dict(initial)  # a fresh LoRA every round
        start.update(weights)
        start.update({k: v for k, v in received.items() if role_of(k) == ROLE_HEAD})
        if self.head == "local":
            start.update({k: v for k, v in local.items() if role_of(k) == ROLE_HEAD})
        return clone(start)

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        upload = {k: v for k, v in trained.items() if self.is_shared(k)}
        local = {k: v for k, v in start.items() if role_of(k) == ROLE_BASE}
        if self.head == "local":
            local.update({k: v for k, v in trained.items() if role_of(k) == ROLE_HEAD})
        return upload, local

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        stacked = stack(uploads, self.plan)
        if self.wire_dtype != torch.float32:  # merge what the clients will receive and merge
            stacked = through_wire(stacked, self.wire_dtype)
        new = {k: v for k, v in server.items() if not k.startswith(STACK_PREFIX)}
        new.update(merge({k: v for k, v in server.items() if role_of(k) == ROLE_BASE}, stacked))
        new.update({STACK_PREFIX + k: v for k, v in stacked.items()})
        heads = [{k: v for k, v in u.tensors.items() if role_of(k) == ROLE_HEAD} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, data_weights(uploads)))
        return SYNC.advance(server, new, uploads)

    def global_state(self, server: State, initial: State) -> State:
        state = dict(initial)
        for module in lora_modules(initial):
            state[module + LORA_B_SUFFIX] = torch.zeros_like(initial[module + LORA_B_SUFFIX])
        state.update({k: v for k, v in server.items() if not k.startswith("_")})
        return state

    def personal_state(self, received: State, local: State, initial: State, client_id: int) -> State:
        start = self.client_start(received, local, initial, client_id)
        for module in lora_modules(start):
            start[module + LORA_B_SUFFIX] = torch.zeros_like(start[module + LORA_B_SUFFIX])
        return start
