"""HAFL (Su, Yan, Deng, ICC 2025): importance-aware heterogeneous federated LoRA.

Every LoRA module is a sum of rank-1 components (B[:, i], A[i, :]). Each has an importance
score from AdaLoRA's smoothed sensitivity, computed by the client while it trains:

    I = |w * dL/dw|,  Ibar <- b1 Ibar + (1 - b1) I,  Ubar <- b2 Ubar + (1 - b2) |I - Ibar|,
    s = Ibar * Ubar,  S_i = mean_j s(B[j, i]) + mean_j s(A[i, j])          (b1 = b2 = 0.85)

A client with budget r_k works on its top-r_k components by importance:

- ``truncation``: it receives only those components (its adapter has rank r_k) and sends
  them back with their indices; the server picks them from the scores the client reported.
- ``freezing``: it receives all r components but trains only its top r_k; the others are
  frozen by gradient masks *and* restored after every optimizer step, so neither weight
  decay nor momentum can move them (checked bit for bit by the tests). It uploads only the
  trained components and their indices.

Aggregation works per component. ``adaptive``: component i becomes the p-weighted mean over
the clients that updated it (unchanged if none did). ``zero_padding`` (the baseline) counts
non-updaters as zeros, shrinking component i by the share of its updaters.

The paper's full text was not available; METHODS.md gives the reconstruction built here.
Choices: importance carries over between rounds in each client's local state; a client that
has no scores yet (round 1) takes the first r_k components; in the truncation scheme the
server keeps each client's last reported scores (bookkeeping, never sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.base import ClientUpload, FederatedMethod, HeadPlacement, LocalHooks, Placement, data_weights
from fedtune.methods.registry import register
from fedtune.resources import RankPlan
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, ROLE_HEAD, State, clone, lora_modules, role_of, weighted_average

INDEX_SUFFIX = ".hafl_index"
SCORE_SUFFIX = ".hafl_score"
IBAR, UBAR = "_hafl.ibar.", "_hafl.ubar."
SERVER_SCORES = "_hafl.scores."
CHOSEN = "_hafl.chosen."


class HAFLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    """Tracks importance of the held components and (freezing) keeps the rest frozen."""

    def __init__(self, start: State, trainable: Mapping[str, torch.Tensor], beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[str, list[torch.Tensor]] = {}
        for key in start:
            if key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)) and not key.startswith("_"):
                self.ema[key] = [torch.zeros_like(start[key]), torch.zeros_like(start[key])]
        #: per factor: a 0/1 mask of trainable entries, and the frozen values to restore
        self.masks = {key: mask for key, mask in trainable.items()}
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
            out[IBAR + key], out[UBAR + key] = ibar, ubar
        return out


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
                server[SERVER_SCORES + module] = torch.zeros(len(self.plan.client_ranks), self.plan.server_rank)
        return server

    def download(self, server: State, client_id: int) -> State:
        payload = {k: v for k, v in server.items() if self.is_shared(k) and not k.startswith("_")}
        if not self.truncation:
            return payload
        for module in lora_modules(payload):
            index = top_components(server[SERVER_SCORES + module][client_id], self.budget(client_id))
            payload[module + LORA_A_SUFFIX] = payload[module + LORA_A_SUFFIX][index]
            payload[module + LORA_B_SUFFIX] = payload[module + LORA_B_SUFFIX][:, index]
            payload[module + INDEX_SUFFIX] = index.to(torch.int32)
        return payload

    # -- client ---------------------------------------------------------------------------------
    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        start = dict(initial)
        start.update({k: v for k, v in local.items() if role_of(k) == ROLE_HEAD and self.head == "local"})
        start.update({k: v for k, v in received.items() if not k.endswith(INDEX_SUFFIX)})
        for module in lora_modules(start):
            rank = start[module + LORA_A_SUFFIX].shape[0]
            if self.truncation:
                index = received[module + INDEX_SUFFIX].long()
            else:
                scores = _module_scores(local, module)
                index = top_components(scores if scores is not None else torch.zeros(rank), self.budget(client_id))
            start[CHOSEN + module] = index
            # importance EMAs at the held components (truncation: a gather of the full-rank state)
            for factor, dim in ((LORA_A_SUFFIX, 0), (LORA_B_SUFFIX, 1)):
                key = module + factor
                for prefix in (IBAR, UBAR):
                    full = local.get(prefix + key)
                    if full is None:
                        start[prefix + key] = torch.zeros_like(start[key])
                    elif self.truncation:
                        start[prefix + key] = full.index_select(dim, index)
                    else:
                        start[prefix + key] = full
        return clone(start)

    def client_init(self, initial: State) -> State:
        return {}

    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        trainable: dict[str, torch.Tensor] = {}
        if not self.truncation:
            for module in lora_modules(start):
                a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
                chosen = torch.zeros(start[a_key].shape[0])
                chosen[start[CHOSEN + module]] = 1.0
                trainable[a_key] = chosen[:, None].expand_as(start[a_key]).clone()
                trainable[b_key] = chosen[None, :].expand_as(start[b_key]).clone()
        hooks = _ImportanceHooks(start, trainable, self.settings.beta1, self.settings.beta2)
        for key in hooks.ema:
            hooks.ema[key] = [start[IBAR + key].clone(), start[UBAR + key].clone()]
        return hooks

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
                held = {k: trained[k] for k in trained if k.startswith((IBAR, UBAR))}
                upload[module + SCORE_SUFFIX] = _module_scores(held, module)
            else:
                upload[a_key], upload[b_key] = trained[a_key][index], trained[b_key][:, index]
            upload[module + INDEX_SUFFIX] = index.to(torch.int32)
            for factor in (LORA_A_SUFFIX, LORA_B_SUFFIX):
                for prefix in (IBAR, UBAR):
                    local[prefix + module + factor] = trained[prefix + module + factor]
        return upload, local

    # -- server ---------------------------------------------------------------------------------
    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        new = dict(server)
        p = data_weights(uploads)
        for module in lora_modules(server):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            a_sum = torch.zeros_like(server[a_key], dtype=torch.float64)
            b_sum = torch.zeros_like(server[b_key], dtype=torch.float64)
            weight = torch.zeros(server[a_key].shape[0], dtype=torch.float64)
            for p_k, u in zip(p, uploads):
                index = u.tensors[module + INDEX_SUFFIX].long()
                a_sum[index] += p_k * u.tensors[a_key].double()
                b_sum[:, index] += p_k * u.tensors[b_key].double()
                weight[index] += p_k
            if self.settings.aggregation == "adaptive":
                updated = weight > 0
                a_new, b_new = server[a_key].double().clone(), server[b_key].double().clone()
                a_new[updated] = a_sum[updated] / weight[updated, None]
                b_new[:, updated] = b_sum[:, updated] / weight[None, updated]
            else:  # zero-padding: non-updaters count as zeros (the total weight is 1)
                a_new, b_new = a_sum, b_sum
            new[a_key], new[b_key] = a_new.to(server[a_key].dtype), b_new.to(server[b_key].dtype)
            if self.truncation:
                scores = server[SERVER_SCORES + module].clone()
                for u in uploads:
                    index = u.tensors[module + INDEX_SUFFIX].long()
                    scores[u.client_id, index] = u.tensors[module + SCORE_SUFFIX].to(scores.dtype)
                new[SERVER_SCORES + module] = scores
        heads = [{k: v for k, v in u.tensors.items() if role_of(k) == ROLE_HEAD and not k.endswith((INDEX_SUFFIX, SCORE_SUFFIX))} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, p))
        return new
