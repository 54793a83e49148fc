"""HetLoRA (Cho et al. 2024): heterogeneous ranks by truncation and zero-padding.

The server keeps rank-r_max factors. Client k downloads the first r_k components
(B[:, :r_k], A[:r_k, :]), trains them, and uploads them; the server zero-pads every upload
to r_max and averages with weights

- ``norm``: w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F per module (the paper's sparsity weighting), or
- ``data_size``: w_k = p_k.

One rank scale: a rank-r_k client's adapter runs at s_k = alpha / r_k (alpha / sqrt(r_k) with
rsLoRA), the server's at s_max = s(r_max). The server's factors mean Delta W = s_max B A; a
client receives B[:, :r_k] * s_max / s_k, so its s_k B_k A_k is exactly the server's
truncated Delta W, and the server multiplies every uploaded B by s_k / s_max before it pads
and averages (the norm weights are therefore proportional to each client's ||Delta W_k||).
s_k is the rank of the client's adapter (its resource rank), also after self-pruning.

Components beyond a client's rank count as zeros in the average, which shrinks them by the
weight of the clients that did update them: the "information dilution" HAFL fixes.

Optional local self-pruning: the loss gets lambda * ||B[:, g:]||_F * ||A[g:, :]||_F (g =
floor(gamma r_k)) summed over modules; when that tail norm ends a round smaller than it
started, the client drops to rank g. The server remembers each client's current rank (a
bookkeeping tensor) and sends only that many components from then on; a pruned client's
unused components stay exactly zero (zero A rows and B columns get zero gradients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.base import ClientUpload, FederatedMethod, HeadPlacement, LocalHooks, Placement, data_weights
from fedtune.methods.registry import register
from fedtune.resources import RankPlan
from fedtune.state import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    ROLE_HEAD,
    State,
    lora_modules,
    pad_rank,
    role_of,
    scale_b,
    weighted_average,
)

RANKS_KEY = "_hetlora.ranks"


class HetLoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    weights: Literal["norm", "data_size"] = "norm"
    self_pruning: bool = False
    prune_gamma: float = Field(0.99, gt=0, lt=1)
    prune_lambda: float = Field(0.01, ge=0)


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F without forming the d_out x d_in product: sqrt(<B^T B, A A^T>_F) from r x r Gram matrices."""
    b, a = b.double(), a.double()
    return float(torch.sqrt(torch.clamp(torch.sum((b.T @ b) * (a @ a.T)), min=0.0)))


def zero_padding_average(uploads: Sequence[ClientUpload], rank: int, weights: str) -> State:
    """Every upload's LoRA factors zero-padded to ``rank`` and averaged (per module).

    The uploads' factors must already be at one common scale (see :meth:`HetLoRA.aggregate`)."""
    padded = [pad_rank({k: v for k, v in u.tensors.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}, rank) for u in uploads]
    p = data_weights(uploads)
    result: State = {}
    for module in lora_modules(padded[0]):
        a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
        w = p
        if weights == "norm":
            norms = [product_norm(u.tensors[b_key], u.tensors[a_key]) for u in uploads]
            if sum(norms) > 0:
                w = [n / sum(norms) for n in norms]
        result.update(weighted_average([{a_key: s[a_key], b_key: s[b_key]} for s in padded], w))
    return result


class _TailNormPenalty(LocalHooks):
    """lambda * sum over modules of ||B[:, g:]||_F * ||A[g:, :]||_F, HetLoRA's pruning regulariser."""

    def __init__(self, modules: list[str], keep: int, lam: float) -> None:
        self.modules, self.keep, self.lam = modules, keep, lam

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        terms = [
            params[m + LORA_B_SUFFIX][:, self.keep :].norm() * params[m + LORA_A_SUFFIX][self.keep :].norm()
            for m in self.modules
        ]
        return self.lam * torch.stack(terms).sum() if terms else None


def tail_norm(state: Mapping[str, torch.Tensor], keep: int) -> float:
    return sum(
        float(state[m + LORA_B_SUFFIX][:, keep:].norm() * state[m + LORA_A_SUFFIX][keep:].norm()) for m in lora_modules(state)
    )


def current_rank(state: Mapping[str, torch.Tensor]) -> int:
    """Components in use: those with a nonzero A row or B column in any module."""
    used = 0
    for m in lora_modules(state):
        a, b = state[m + LORA_A_SUFFIX], state[m + LORA_B_SUFFIX]
        nonzero = (a.abs().sum(1) > 0) | (b.abs().sum(0) > 0)
        used = max(used, int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0)
    return used


@register
class HetLoRA(FederatedMethod):
    name = "hetlora"
    summary = "HetLoRA: rank-r_k truncation download, zero-padding aggregation (norm|data_size weights), self-pruning"
    supports_heterogeneous_ranks = True

    def __init__(self, plan: RankPlan, settings: HetLoRASettings | None = None, head: HeadPlacement = "shared") -> None:
        super().__init__(head=head)
        self.plan = plan
        self.settings = settings or HetLoRASettings()

    @classmethod
    def from_config(cls, config: Any) -> HetLoRA:
        return cls(RankPlan.from_config(config), config.hetlora, config.head)

    def placement(self, key: str) -> Placement:
        return self.head if role_of(key) == ROLE_HEAD else "shared"

    def server_init(self, initial: State) -> State:
        server = super().server_init(initial)
        server[RANKS_KEY] = torch.tensor(self.plan.client_ranks, dtype=torch.int64)
        return server

    def client_rank(self, server: State, client_id: int) -> int:
        return int(server[RANKS_KEY][client_id])

    def download(self, server: State, client_id: int) -> State:
        """The first r_k components (r_k = the client's current, possibly pruned, rank), B at
        the client's scale."""
        truncated = pad_rank(super().download(server, client_id), self.client_rank(server, client_id))
        return scale_b(truncated, self.plan.to_client_scale(self.plan.client_ranks[client_id]))

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        # A pruned client receives fewer components than its adapter has; the rest stay 0.
        slot_rank = next(v.shape[0] for k, v in initial.items() if k.endswith(LORA_A_SUFFIX))
        return super().client_start(pad_rank(received, slot_rank), local, initial, client_id)

    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        if not self.settings.self_pruning:
            return None
        keep = math.floor(self.settings.prune_gamma * max(current_rank(start), 1))
        return _TailNormPenalty(lora_modules(start), keep, self.settings.prune_lambda)

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        upload, local = super().client_finish(trained, start)
        rank = max(current_rank(start), 1)
        if self.settings.self_pruning:
            keep = math.floor(self.settings.prune_gamma * rank)
            if keep >= 1 and tail_norm(trained, keep) < tail_norm(start, keep):
                rank = keep
        return pad_rank(upload, rank), local

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        new = dict(server)
        at_server_scale = [
            ClientUpload(u.client_id, u.num_examples, scale_b(u.tensors, self.plan.to_server_scale(self.plan.client_ranks[u.client_id])))
            for u in uploads
        ]
        new.update(zero_padding_average(at_server_scale, self.plan.server_rank, self.settings.weights))
        heads = [{k: v for k, v in u.tensors.items() if self.is_shared(k) and role_of(k) == ROLE_HEAD} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, data_weights(uploads)))
        ranks = server[RANKS_KEY].clone()
        for u in uploads:
            a = next(v for k, v in u.tensors.items() if k.endswith(LORA_A_SUFFIX))
            ranks[u.client_id] = a.shape[0]
        new[RANKS_KEY] = ranks
        return new
