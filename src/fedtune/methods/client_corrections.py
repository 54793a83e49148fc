"""Client-side corrections that compose with any method: FedProx (Li et al., MLSys 2020).

FedProx adds mu/2 ||theta - theta_received||^2 to each client's loss, over the tensors the
client trains *and* shares (FedIT's A, B and head; FFA-LoRA's B; Fed-ALoRA's B, not its
personal A; a HAFL client's held components; full weights), so local training cannot drift
far from the model the server sent. It rides on the method's own local hooks
(:class:`Combined`), so HAFL's importance tracking and freezing keep working under it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.base import FederatedMethod, LocalHooks
from fedtune.state import State, is_bookkeeping


class FedProxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mu: float = Field(0.0, ge=0, description="weight of the proximal term; 0: off")


class ProximalTerm(LocalHooks):
    def __init__(self, anchor: Mapping[str, torch.Tensor], mu: float) -> None:
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.mu = mu

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        terms = [((params[k] - a.to(params[k].device)) ** 2).sum() for k, a in self.anchor.items() if k in params]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None


def proximal_anchor(method: FederatedMethod, start: State) -> State:
    """The received values of the tensors a client trains and shares."""
    return {k: v for k, v in start.items() if not is_bookkeeping(k) and method.trains(k) and method.is_shared(k)}


class Combined(LocalHooks):
    """Several hooks as one: extra losses add up, the other calls run in order."""

    def __init__(self, *hooks: LocalHooks | None) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        losses = [loss for h in self.hooks if (loss := h.extra_loss(params)) is not None]
        return torch.stack(losses).sum() if losses else None

    def after_backward(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for h in self.hooks:
            h.after_backward(params)

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for h in self.hooks:
            h.after_step(params)

    def extras(self) -> State:
        out: State = {}
        for h in self.hooks:
            out.update(h.extras())
        return out


def client_hooks(method: FederatedMethod, start: State, local: State, fedprox_mu: float) -> LocalHooks | None:
    """The method's own hooks, with the FedProx term when ``fedprox_mu`` > 0."""
    own = method.local_hooks(start, local)
    if fedprox_mu <= 0:
        return own
    return Combined(own, ProximalTerm(proximal_anchor(method, start), fedprox_mu))
