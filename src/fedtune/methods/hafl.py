"""HAFL (Su, Yan, Deng, ICC 2025): importance-aware heterogeneous federated LoRA.

Every LoRA module is a sum of rank-1 components (B[:, i], A[i, :]). Each has an importance
score from AdaLoRA's smoothed sensitivity, computed by the client while it trains:

    I = |w * dL/dw|,  Ibar <- b1 Ibar + (1 - b1) I,  Ubar <- b2 Ubar + (1 - b2) |I - Ibar|,
    s = Ibar * Ubar,  S_i = mean_j s(B[j, i]) + mean_j s(A[i, j])          (b1 = b2 = 0.85)

A client with budget r_k works on its top-r_k components by importance:

- ``truncation``: the *server* ranks the components by a global importance G_i and sends
  client k only its top r_k (its adapter has rank r_k); the client sends them back with
  their indices and the scores S_i it measured for them. The server combines those into
  G: the p-weighted mean over this round's clients that held component i,
  G_i = sum_k p_k S_{k,i} / sum_k p_k; a component nobody held this round keeps its last
  G_i (G starts at 0, so round 1 sends components 0..r_k-1, and components no client ever
  held stay at 0: the clients with the full budget are the ones that explore).
- ``freezing``: it receives all r components but trains only its top r_k by its *own*
  importance; the others are frozen by gradient masks *and* restored after every optimizer
  step, so neither weight decay nor momentum can move them (checked bit for bit by the
  tests). It uploads only the trained components and their indices.

Aggregation works per component. ``adaptive``: component i becomes the p-weighted mean over
the clients that updated it (unchanged if none did). ``zero_padding`` (the baseline) counts
non-updaters as zeros, shrinking component i by the share of its updaters.

One rank scale: a truncation client's rank-r_k adapter runs at s(r_k) = alpha / r_k (alpha /
sqrt(r_k) with rsLoRA), the server's factors at s(r). The client receives B's columns times
s(r) / s(r_k) and the server multiplies uploaded B's by s(r_k) / s(r), so both sides mean the
same Delta W (a single client's round leaves the global Delta W equal to what it trained).
The importance is unchanged by that rescaling (|w * dL/dw| is invariant to it). Freezing
clients hold all r components at the server's scale.

The paper's full text was not available; METHODS.md gives the reconstruction built here.
Choices: each client keeps its importance EMAs at the full rank r in its local state (a
truncation client gathers the held components' EMAs, updates them while it trains and
scatters them back; components it did not hold keep their old values); a freezing client
that has no scores yet (round 1) trains the first r_k components; frozen components keep
accumulating importance from their gradients, so they can be chosen again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.base import ClientUpload, FederatedMethod, HeadPlacement, LocalHooks, Placement, data_weights
from fedtune.methods.registry import register
from fedtune.resources import RankPlan
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, ROLE_HEAD, State, clone, lora_modules, role_of, scale_b, weighted_average

INDEX_SUFFIX = ".hafl_index"
SCORE_SUFFIX = ".hafl_score"
IBAR, UBAR = "_hafl.ibar.", "_hafl.ubar."
IMPORTANCE = "_hafl.importance."
CHOSEN = "_hafl.chosen."


class HAFLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    scheme: Literal["truncation", "freezing"] = "freezing"
    aggregation: Literal["adaptive", "zero_padding"] = "adaptive"
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.85, ge=0, lt=1)


# -- importance ---------------------------------------------------------------------------------
def update_importance(
    ibar: torch.Tensor, ubar: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of AdaLoRA's smoothed sensitivity (Ubar uses the already-updated Ibar)."""
    sensitivity = (weight * grad).abs()
    ibar = beta1 * ibar + (1 - beta1) * sensitivity
    ubar = beta2 * ubar + (1 - beta2) * (sensitivity - ibar).abs()
    return ibar, ubar


def component_scores(score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """S_i = mean_j s(B[j, i]) + mean_j s(A[i, j]) for s = Ibar * Ubar of A (r x d_in), B (d_out x r)."""
    return score_b.mean(dim=0) + score_a.mean(dim=1)


def top_components(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(-scores, stable=True).indices[:budget]
    return torch.sort(order).values


def _module_scores(state: Mapping[str, torch.Tensor], module: str) -> torch.Tensor | None:
    a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
    if IBAR + a_key not in state:
        return None
    score_a = state[IBAR + a_key] * state[UBAR + a_key]
    score_b = state[IBAR + b_key] * state[UBAR + b_key]
    return component_scores(score_a, score_b)


class _ImportanceHooks(LocalHooks):
    """Tracks the importance of the held components and (freezing) keeps the rest frozen.

    ``held`` maps a factor key to the component indices its trained tensor holds (truncation:
    the r_k components sent; None: all r). The EMAs are full rank: gathered here at the held
    components, updated every step, scattered back by :meth:`extras`.
    """

    def __init__(
        self,
        start: State,
        trainable: Mapping[str, torch.Tensor],
        held: Mapping[str, torch.Tensor | None],
        beta1: float,
        beta2: float,
    ) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.held = dict(held)
        self.full = {key: (start[IBAR + key], start[UBAR + key]) for key in held}
        self.ema = {key: [_gather(ibar, key, held[key]), _gather(ubar, key, held[key])] for key, (ibar, ubar) in self.full.items()}
        #: per factor: a 0/1 mask of trainable entries, and the frozen values to restore
        self.masks = dict(trainable)
        self.frozen_values = {key: start[key].clone() for key in trainable}

    def after_backward(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for key, (ibar, ubar) in self.ema.items():
                param = params[key]
                if param.grad is None:
                    continue
                new_i, new_u = update_importance(
                    ibar, ubar, param.detach().cpu(), param.grad.detach().cpu(), self.beta1, self.beta2
                )
                self.ema[key] = [new_i, new_u]
                if key in self.masks:
                    param.grad.mul_(self.masks[key].to(param.grad.device))

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for key, mask in self.masks.items():
                param = params[key]
                frozen = self.frozen_values[key].to(param.device)
                keep = mask.to(param.device).bool()
                param.copy_(torch.where(keep, param, frozen))

    def extras(self) -> State:
        out: State = {}
        for key, (ibar, ubar) in self.ema.items():
            full_i, full_u = self.full[key]
            out[IBAR + key] = _scatter(full_i, key, self.held[key], ibar)
            out[UBAR + key] = _scatter(full_u, key, self.held[key], ubar)
        return out


def _component_dim(key: str) -> int:
    return 0 if key.endswith(LORA_A_SUFFIX) else 1  # A is r x d_in, B is d_out x r


def _gather(full: torch.Tensor, key: str, index: torch.Tensor | None) -> torch.Tensor:
    return full.clone() if index is None else full.index_select(_component_dim(key), index)


def _scatter(full: torch.Tensor, key: str, index: torch.Tensor | None, held: torch.Tensor) -> torch.Tensor:
    return held.clone() if index is None else full.index_copy(_component_dim(key), index, held)


@register
class HAFL(FederatedMethod):
    name = "hafl"
    summary = "HAFL: importance-based truncation or freezing of rank-1 components, adaptive rank-1 aggregation"
    supports_heterogeneous_ranks = True

    def __init__(self, plan: RankPlan, settings: HAFLSettings | None = None, head: HeadPlacement = "shared") -> None:
        super().__init__(head=head)
        self.plan = plan
        self.settings = settings or HAFLSettings()

    @classmethod
    def from_config(cls, config: Any) -> HAFL:
        return cls(RankPlan.from_config(config), config.hafl, config.head)

    @property
    def truncation(self) -> bool:
        return self.settings.scheme == "truncation"

    def placement(self, key: str) -> Placement:
        return self.head if role_of(key) == ROLE_HEAD else "shared"

    def budget(self, client_id: int) -> int:
        return min(self.plan.client_ranks[client_id], self.plan.server_rank)

    def model_rank(self, client_id: int) -> int:
        # freezing: every client holds all r components and trains its top r_k of them
        return self.budget(client_id) if self.truncation else self.plan.server_rank

    # -- server -> client ---------------------------------------------------------------------
    def server_init(self, initial: State) -> State:
        server = super().server_init(initial)
        if self.truncation:
            for module in lora_modules(server):
                server[IMPORTANCE + module] = torch.zeros(self.plan.server_rank, dtype=torch.float32)
        return server

    def download(self, server: State, client_id: int) -> State:
        payload = {k: v for k, v in server.items() if self.is_shared(k) and not k.startswith("_")}
        if not self.truncation:
            return payload
        budget = self.budget(client_id)
        for module in lora_modules(payload):
            index = top_components(server[IMPORTANCE + module], budget)
            payload[module + LORA_A_SUFFIX] = payload[module + LORA_A_SUFFIX][index]
            payload[module + LORA_B_SUFFIX] = payload[module + LORA_B_SUFFIX][:, index]
            payload[module + INDEX_SUFFIX] = index.to(torch.int32)
        return scale_b(payload, self.plan.to_client_scale(budget))

    # -- client ---------------------------------------------------------------------------------
    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        start = dict(initial)
        start.update({k: v for k, v in local.items() if role_of(k) == ROLE_HEAD and self.head == "local"})
        start.update({k: v for k, v in received.items() if not k.endswith(INDEX_SUFFIX)})
        rank = self.plan.server_rank
        for module in lora_modules(start):
            if self.truncation:
                index = received[module + INDEX_SUFFIX].long()
            else:
                scores = _module_scores(local, module)
                index = top_components(scores if scores is not None else torch.zeros(rank), self.budget(client_id))
            start[CHOSEN + module] = index
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            full_shapes = {a_key: (rank, start[a_key].shape[1]), b_key: (start[b_key].shape[0], rank)}
            for key, shape in full_shapes.items():
                for prefix in (IBAR, UBAR):
                    start[prefix + key] = local[prefix + key] if prefix + key in local else torch.zeros(shape, dtype=start[key].dtype)
        return clone(start)

    def client_init(self, initial: State) -> State:
        return {}

    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        trainable: dict[str, torch.Tensor] = {}
        held: dict[str, torch.Tensor | None] = {}
        for module in lora_modules(start):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            chosen = start[CHOSEN + module]
            held[a_key] = held[b_key] = chosen if self.truncation else None
            if not self.truncation:
                mask = torch.zeros(start[a_key].shape[0])
                mask[chosen] = 1.0
                trainable[a_key] = mask[:, None].expand_as(start[a_key]).clone()
                trainable[b_key] = mask[None, :].expand_as(start[b_key]).clone()
        return _ImportanceHooks(start, trainable, held, self.settings.beta1, self.settings.beta2)

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        upload = {k: v for k, v in trained.items() if role_of(k) == ROLE_HEAD and self.is_shared(k) and not k.startswith("_")}
        local: State = {}
        if self.head == "local":
            local.update({k: v for k, v in trained.items() if role_of(k) == ROLE_HEAD and not k.startswith("_")})
        for module in lora_modules({k: v for k, v in trained.items() if not k.startswith("_")}):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            index = trained[CHOSEN + module]
            if self.truncation:
                upload[a_key], upload[b_key] = trained[a_key], trained[b_key]
                upload[module + SCORE_SUFFIX] = _module_scores(trained, module)[index]
            else:
                upload[a_key], upload[b_key] = trained[a_key][index], trained[b_key][:, index]
            upload[module + INDEX_SUFFIX] = index.to(torch.int32)
            for key in (a_key, b_key):
                for prefix in (IBAR, UBAR):
                    local[prefix + key] = trained[prefix + key]
        return upload, local

    # -- server ---------------------------------------------------------------------------------
    def check_upload(self, upload: State, received: State, client_id: int) -> str | None:
        for module in lora_modules(upload):
            index = upload[module + INDEX_SUFFIX]
            if upload[module + LORA_A_SUFFIX].shape[0] != index.numel():
                return f"{module}: {upload[module + LORA_A_SUFFIX].shape[0]} components but {index.numel()} indices"
            if self.truncation and not torch.equal(index.long(), received[module + INDEX_SUFFIX].long()):
                return f"{module}: indices {index.tolist()[:8]} are not the components sent {received[module + INDEX_SUFFIX].tolist()[:8]}"
            if self.truncation and bool((upload[module + SCORE_SUFFIX] < 0).any()):
                return f"{module}: negative importance scores"
        return None

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        new = dict(server)
        p = data_weights(uploads)
        if self.truncation:  # every client's B back at the server's scale
            uploads = [
                ClientUpload(u.client_id, u.num_examples, scale_b(u.tensors, self.plan.to_server_scale(self.budget(u.client_id))))
                for u in uploads
            ]
        for module in lora_modules(server):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            a_sum = torch.zeros_like(server[a_key], dtype=torch.float64)
            b_sum = torch.zeros_like(server[b_key], dtype=torch.float64)
            weight = torch.zeros(server[a_key].shape[0], dtype=torch.float64)
            score_sum = torch.zeros_like(weight)
            for p_k, u in zip(p, uploads):
                index = u.tensors[module + INDEX_SUFFIX].long()
                a_sum[index] += p_k * u.tensors[a_key].double()
                b_sum[:, index] += p_k * u.tensors[b_key].double()
                weight[index] += p_k
                if self.truncation:
                    score_sum[index] += p_k * u.tensors[module + SCORE_SUFFIX].double()
            updated = weight > 0
            if self.settings.aggregation == "adaptive":
                a_new, b_new = server[a_key].double().clone(), server[b_key].double().clone()
                a_new[updated] = a_sum[updated] / weight[updated, None]
                b_new[:, updated] = b_sum[:, updated] / weight[None, updated]
            else:  # zero-padding: non-updaters count as zeros (the total weight is 1)
                a_new, b_new = a_sum, b_sum
            new[a_key], new[b_key] = a_new.to(server[a_key].dtype), b_new.to(server[b_key].dtype)
            if self.truncation:  # the global importance: p-weighted mean over the holders
                importance = server[IMPORTANCE + module].double().clone()
                importance[updated] = score_sum[updated] / weight[updated]
                new[IMPORTANCE + module] = importance.to(server[IMPORTANCE + module].dtype)
        heads = [{k: v for k, v in u.tensors.items() if role_of(k) == ROLE_HEAD and not k.endswith((INDEX_SUFFIX, SCORE_SUFFIX))} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, p))
        return new
