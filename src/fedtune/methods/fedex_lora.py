"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): FedIT's averages plus the exact residual.

FedIT's global model s B_bar A_bar is not the clients' mean update s sum_k p_k B_k A_k.
FedEx-LoRA keeps FedIT's averaged factors (so every client continues from one LoRA) and
folds the difference into the frozen target weight:

    W <- W + s (sum_k p_k B_k A_k - B_bar A_bar),    then W + s B_bar A_bar = W_old + s sum_k p_k B_k A_k.

The residual is exact but dense (rank <= sum_k r_k + r). How it reaches the clients (the
choice the paper leaves open; its code sends dense W):

- a client that holds last round's W (it was synchronised one aggregation ago) receives the
  round's *stack* of client factors, A_stack = [p_k A_k] (rows) and B_stack = [s B_k]
  (columns), and forms the residual itself as B_stack A_stack - s B_bar A_bar from the
  B_bar, A_bar it receives in the same download: K r (d_in + d_out) values per module, the
  averaged factors not sent twice;
- a client that missed rounds receives the dense W (always in full precision,
  ``fedtune.state.travels_exact``), as FLoRA's clients do.

Every byte of both is in the payload the server counts. The residual is added as
B @ A for nn.Linear's (d_out x d_in) weight: no transposition (the public code transposes it,
which is right only for GPT-2's Conv1D).

Server and clients must hold the same W bit for bit: both call :func:`fold_residual` on the
same tensors. With a bf16/fp16 wire the server rounds the stack and the new averages to the
wire dtype before folding and keeps the rounded averages, so its W and factors are exactly
the clients'. Ranks are homogeneous (the paper's setting); the scale s is the run's alpha / r.
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
    ROLE_BASE,
    WIRE_DTYPES,
    State,
    clone,
    lora_modules,
    role_of,
    through_wire,
    weighted_average,
)

SYNC = WeightSync("fedex")  # bookkeeping keys _fedex.round, _fedex.synced
STACK_PREFIX = "_fedex.stack."
#: the stacked factors' key suffixes in a download (not LoRA factors: nothing trains them)
STACK_A, STACK_B = ".residual_stack_A", ".residual_stack_B"


def fold_residual(weight: torch.Tensor, stack_a: torch.Tensor, stack_b: torch.Tensor, a_bar: torch.Tensor, b_bar: torch.Tensor, scale: float) -> torch.Tensor:
    """W + (B_stack A_stack - s B_bar A_bar), the same float ops wherever it runs."""
    return weight + (stack_b @ stack_a - scale * (b_bar @ a_bar))


@register
class FedExLoRA(HoldsMergedWeights):
    name = "fedex-lora"
    summary = "FedEx-LoRA: FedIT's averaged A and B plus the exact residual folded into the base weights"
    server_opt_refusal = (
        "its residual makes W + s B_bar A_bar the clients' exact mean; a server step on A and B would move "
        "the model away from that mean without a residual to match"
    )

    def __init__(self, plan: RankPlan, head: HeadPlacement = "shared", wire_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(head=head)
        self.plan = plan
        self.wire_dtype = wire_dtype
        self.scale = plan.scale(plan.server_rank)

    @classmethod
    def from_config(cls, config: Any) -> FedExLoRA:
        return cls(RankPlan.from_config(config), config.head, WIRE_DTYPES[config.wire_dtype])

    def server_init(self, initial: State) -> State:
        server = clone({k: v for k, v in initial.items() if role_of(k) == ROLE_BASE or self.is_shared(k)})
        return SYNC.init(server, len(self.plan.client_ranks))

    def download(self, server: State, client_id: int) -> State:
        payload = {k: v for k, v in server.items() if self.is_shared(k) and not k.startswith("_")}
        behind = SYNC.behind(server, client_id)
        if behind == 1:
            payload.update({k[len(STACK_PREFIX) :]: v for k, v in server.items() if k.startswith(STACK_PREFIX)})
        elif behind > 1:
            payload.update({k: v for k, v in server.items() if role_of(k) == ROLE_BASE})
        return payload

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        weights = {k: v for k, v in (local or initial).items() if role_of(k) == ROLE_BASE}
        stacked = {k: v for k, v in received.items() if k.endswith((STACK_A, STACK_B))}
        received = {k: v for k, v in received.items() if k not in stacked}
        if any(role_of(k) == ROLE_BASE for k in received):
            weights = {k: v for k, v in received.items() if role_of(k) == ROLE_BASE}
        elif stacked:
            weights.update(self.fold(weights, stacked, received))
        start = dict(initial)
        start.update(local)
        start.update(received)
        start.update(weights)
        return clone(start)

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        upload = {k: v for k, v in trained.items() if self.is_shared(k)}
        local = {k: v for k, v in start.items() if role_of(k) == ROLE_BASE}
        local.update({k: v for k, v in trained.items() if role_of(k) != ROLE_BASE and self.is_local(k)})
        return upload, local

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        p = data_weights(uploads)
        averaged = weighted_average([u.tensors for u in uploads], p)
        stacked: State = {}
        for module in lora_modules(uploads[0].tensors):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            stacked[module + STACK_A] = torch.cat([p_k * u.tensors[a_key] for p_k, u in zip(p, uploads)], dim=0)
            stacked[module + STACK_B] = torch.cat([self.scale * u.tensors[b_key] for u in uploads], dim=1)
        if self.wire_dtype != torch.float32:  # fold (and keep) exactly what the clients will receive
            stacked, averaged = through_wire(stacked, self.wire_dtype), through_wire(averaged, self.wire_dtype)
        new = {k: v for k, v in server.items() if not k.startswith(STACK_PREFIX)}
        new.update(averaged)
        new.update(self.fold(server, stacked, averaged))
        new.update({STACK_PREFIX + k: v for k, v in stacked.items()})
        return SYNC.advance(server, new, uploads)

    def fold(self, weights: State, stacked: State, factors: State) -> State:
        """Each module's W with the round's residual folded in: server and clients call this on
        the same tensors, so they hold the same W bit for bit."""
        folded = {}
        for module in lora_modules(factors):
            key = module + BASE_SUFFIX
            folded[key] = fold_residual(
                weights[key], stacked[module + STACK_A], stacked[module + STACK_B],
                factors[module + LORA_A_SUFFIX], factors[module + LORA_B_SUFFIX], self.scale,
            )  # fmt: skip
        return folded

    def export_state(self, state: State) -> State:
        """The global model as merged target weights: W + s B_bar A_bar (and the head)."""
        merged = {k: v for k, v in state.items() if not k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}
        for module in lora_modules(state):
            key = module + BASE_SUFFIX
            merged[key] = state[key] + self.scale * (state[module + LORA_B_SUFFIX] @ state[module + LORA_A_SUFFIX])
        return merged
