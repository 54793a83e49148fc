"""Server optimisers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

They act on the pseudo-gradient of every shared tensor, Delta = x_bar - x_prev, where x_bar is
the method's own aggregate and x_prev the server's tensor before the round:

    FedAvgM:    m <- beta m + Delta;                        x <- x_prev + eta m
    FedAdagrad: v <- v + Delta^2
    FedYogi:    v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)
    FedAdam:    v <- beta2 v + (1 - beta2) Delta^2
                (all three) m <- beta1 m + (1 - beta1) Delta;  x <- x_prev + eta m / (sqrt(v) + tau)

Choices: m and v start at zero (as Flower's FedOpt strategies do; the paper's v_0 = tau^2 is
one line away); the moments live in the server state as bookkeeping tensors, so they are part
of every checkpoint and a resumed run continues exactly. A component nobody updated this round
(HAFL, HetLoRA's padding) has Delta = 0 there but keeps moving with its momentum, as any
parameter with a zero gradient does under these optimisers. Methods whose server state is not
an aggregate of the uploads (FlexLoRA's redistribution, FLoRA's merge) refuse them.

Pure tensor functions: the server calls :meth:`ServerOptimizer.step` after the method's
``aggregate``; nothing else changes, and ``server_opt.name=none`` (the default) is plain
aggregation, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.state import State, is_bookkeeping

MOMENT = "_server_opt.m."
SECOND = "_server_opt.v."


class ServerOptSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "none"
    lr: float = Field(1.0, gt=0, description="eta, the server learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="beta of FedAvgM")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity: the floor under sqrt(v)")


class ServerOptimizer:
    def __init__(self, settings: ServerOptSettings) -> None:
        self.settings = settings

    @property
    def active(self) -> bool:
        return self.settings.name != "none"

    def step(self, previous: Mapping[str, torch.Tensor], aggregate: State) -> State:
        """The new server state: ``aggregate`` with every shared float tensor replaced by the
        optimiser's step from ``previous``; the moments updated in the returned state."""
        if not self.active:
            return aggregate
        s = self.settings
        new = dict(aggregate)
        for key, value in aggregate.items():
            if is_bookkeeping(key) or not value.is_floating_point() or key not in previous:
                continue
            x_prev = previous[key].double()
            delta = value.double() - x_prev
            m = aggregate.get(MOMENT + key, torch.zeros_like(value)).double()
            if s.name == "fedavgm":
                m = s.momentum * m + delta
                x = x_prev + s.lr * m
            else:
                v = aggregate.get(SECOND + key, torch.zeros_like(value)).double()
                square = delta * delta
                if s.name == "fedadagrad":
                    v = v + square
                elif s.name == "fedyogi":
                    v = v - (1 - s.beta2) * square * torch.sign(v - square)
                else:  # fedadam
                    v = s.beta2 * v + (1 - s.beta2) * square
                m = s.beta1 * m + (1 - s.beta1) * delta
                x = x_prev + s.lr * m / (torch.sqrt(v) + s.tau)
                new[SECOND + key] = v.to(value.dtype)
            new[key] = x.to(value.dtype)
            new[MOMENT + key] = m.to(value.dtype)
        return new
