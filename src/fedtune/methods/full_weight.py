"""Beyond LoRA: full-weight FedAvg, with AdamW or with GaLore as the local optimizer (seed 001).

Clients train the base weights themselves (the target modules' weights and the head, or
the whole model) and the server averages them: W = sum_k p_k W_k. Clients upload W_k;
W_k and the delta W_k - W carry the same bytes and give the same average since
sum_k p_k = 1.

GaLore (Zhao et al. 2024) keeps Adam's moments in a rank-r projection of each weight
matrix's gradient, refreshed every ``update_proj_gap`` steps. Seed 001's point: each
client's update lives in its own rank-r subspace, so their average is not confined to one
low-rank subspace as federated LoRA's is. We use ``galore-torch``; its GaLoreAdamW only
projects parameters in a param group that carries ``rank`` (a bare parameter list
silently runs plain AdamW, the bug in the seed's public code), so the group is built here
and tested. Optimizer state is reset every round (METHODS.md's default choice): a client
sampled again starts a fresh optimizer, as with every other method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.base import RoleSharingMethod
from fedtune.methods.registry import register
from fedtune.state import ROLE_WEIGHT


class FullWeightSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    #: target: the LoRA target modules' weights (+ head); all: every parameter of the model.
    scope: Literal["target", "all"] = "target"


class GaLoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    rank: int = Field(8, gt=0)
    update_proj_gap: int = Field(50, gt=0)
    scale: float = Field(0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"


@register
class FedAvgFull(RoleSharingMethod):
    name = "fedavg-full"
    summary = "Full-weight FedAvg of the target weights or the whole model (full.scope), AdamW locally"
    uses_lora = False
    export_format = "model"
    shared_roles = frozenset({ROLE_WEIGHT})

    @classmethod
    def from_config(cls, config: Any) -> FedAvgFull:
        # The head is one of the weights here: always trained and averaged.
        return cls()


@register
class FedAvgGaLore(FedAvgFull):
    name = "fedavg-galore"
    summary = "Full-weight FedAvg with GaLore (galore-torch GaLoreAdamW) as the client optimizer"

    def __init__(self, galore: GaLoreSettings | None = None) -> None:
        super().__init__()
        self.galore = galore or GaLoreSettings()

    @classmethod
    def from_config(cls, config: Any) -> FedAvgGaLore:
        return cls(galore=config.galore)

    def make_optimizer(
        self,
        params: Mapping[str, torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        matrix_keys: frozenset[str] = frozenset(),
    ) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        projected = [p for k, p in params.items() if k in matrix_keys and p.dim() == 2]
        plain = [p for k, p in params.items() if not (k in matrix_keys and p.dim() == 2)]
        if not projected:
            raise ValueError("GaLore found no weight matrices to project among the trainable parameters")
        groups: list[dict[str, Any]] = [
            {
                "params": projected,
                "rank": self.galore.rank,
                "update_proj_gap": self.galore.update_proj_gap,
                "scale": self.galore.scale,
                "proj_type": self.galore.proj_type,
            }
        ]
        if plain:
            groups.insert(0, {"params": plain})
        return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True)
