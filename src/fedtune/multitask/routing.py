"""How a multi-adapter layer weighs its N adapters for each token.

- ``soft`` (the ALoRA / HydraLoRA reference code): ``softmax(W_r x)`` per token.
- ``task_id``: one-hot on the example's task index; no router exists (needs N = number of tasks).
- ``top_k`` (soft routing only): keep the k largest soft weights of each token, renormalise them to
  sum to 1; the others are exactly 0.
- ``balance_loss``: the Switch-Transformer load-balancing loss per layer,
  ``N · Σ_i f_i · P_i``, where P_i is the mean router probability of adapter i over the batch's real
  (non-padding) tokens and f_i the share of those tokens that select adapter i (their top-1, or
  top-k / k with ``top_k``; no gradient through f). It is 1 when routing is uniform and grows to N
  when every token picks one adapter. The training loss adds ``balance_loss × mean over layers``.

All layers of one model share one :class:`RoutingContext`: the model sets the batch's task and token
mask there before each forward, and the layers leave their balance terms and (when asked) their
routing statistics there, so nothing needs threading through the transformer's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

RoutingMode = Literal["soft", "task_id"]


@dataclass(frozen=True)
class RoutingSpec:
    mode: RoutingMode = "soft"
    top_k: int | None = None
    balance_loss: float = 0.0


class RouterRecorder:
    """Mean routing weights per task, over real tokens and over layers (for reports)."""

    def __init__(self, num_tasks: int, num_adapters: int) -> None:
        self.sums = torch.zeros(num_tasks, num_adapters, dtype=torch.float64)
        self.counts = torch.zeros(num_tasks, dtype=torch.float64)

    def add(self, task: int, weights: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        flat = weights.detach().reshape(-1, weights.shape[-1]).double().cpu()
        if token_mask is not None:
            flat = flat[token_mask.reshape(-1).cpu()]
        # every layer adds its tokens, so sums / counts is the mean over tokens and layers
        self.sums[task] += flat.sum(0)
        self.counts[task] += flat.shape[0]

    def means(self) -> torch.Tensor:
        """(num_tasks, num_adapters); a task never seen gets a row of NaN."""
        return self.sums / self.counts.unsqueeze(-1)


@dataclass
class RoutingContext:
    """What the current forward pass tells every multi-adapter layer of a model."""

    #: the task of the current batch (batches are single-task)
    task: int | None = None
    #: (batch, seq) bool, True on real tokens; captured from the model's ``attention_mask``
    token_mask: torch.Tensor | None = None
    #: test hook: weights broadcastable to (..., N) used instead of the router
    override: torch.Tensor | None = None
    #: one balance-loss term per layer of the current training forward
    balance_terms: list[torch.Tensor] = field(default_factory=list)
    recorder: RouterRecorder | None = None

    def mask_for(self, weights: torch.Tensor) -> torch.Tensor | None:
        """The token mask when it matches the layer's (batch, seq) shape, else None (all real)."""
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(weights.shape[:-1]):
            return None
        return mask.to(weights.device)


def keep_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(renormalised weights with all but the top ``k`` zeroed, the boolean selection mask)."""
    top = torch.topk(probs, k, dim=-1).indices
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
    kept = probs * selected
    return kept / kept.sum(-1, keepdim=True), selected


def switch_balance_loss(probs: torch.Tensor, selected: torch.Tensor, k: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``N · Σ_i f_i · P_i`` over the real tokens (see the module docstring)."""
    num_adapters = probs.shape[-1]
    flat_probs = probs.reshape(-1, num_adapters)
    flat_selected = selected.reshape(-1, num_adapters).to(probs.dtype)
    if token_mask is not None:
        keep = token_mask.reshape(-1)
        flat_probs, flat_selected = flat_probs[keep], flat_selected[keep]
    if flat_probs.shape[0] == 0:
        return probs.sum() * 0.0
    mean_probs = flat_probs.mean(0)
    dispatch = flat_selected.mean(0) / k
    return num_adapters * (dispatch.detach() * mean_probs).sum()
