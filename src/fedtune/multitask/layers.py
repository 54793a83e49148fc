"""Multi-adapter LoRA linear layers: ALoRA, HydraLoRA and plain LoRA as one module.

On a frozen linear ``W0`` (d_out × d_in), with routing weights ``g(x)`` over N adapters and
scale ``s = alpha / r``:

- ALoRA (N A's, one shared B):     ``h = W0 x + s · Σ_i g_i(x) · B A_i x``
- HydraLoRA (one shared A, N B's): ``h = W0 x + s · Σ_i g_i(x) · B_i A x``
- LoRA (one A, one B):             ``h = W0 x + s · B A x``

The three differ only in how many A's and B's they hold, so one module serves all: ``lora_A`` is a
(num_A, r, d_in) parameter and ``lora_B`` (num_B, d_out, r), with (num_A, num_B) = (N, 1), (1, N)
or (1, 1). Plain LoRA is this module with N = 1 rather than peft's layer, so the baseline runs the
same code, optimiser and export as the multi-adapter variants (tests check it matches peft's LoRA
exactly). With N = 1 no router exists (a softmax over one adapter is always 1); with
``routing=task_id`` neither (the task picks the adapter).

Initialisation as in PEFT: every A_i its own Kaiming-uniform draw (a = √5), every B zero, the router
like ``nn.Linear`` (Kaiming-uniform, no bias), all from one generator so a seed fixes them.

Both mixtures reduce to one matrix product after the A's: ALoRA needs B·(Σ_i g_i A_i x), HydraLoRA
[B_1 … B_N]·(g ⊗ A x); neither materialises N full-size outputs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedtune.multitask.routing import RoutingContext, RoutingSpec, keep_top_k, switch_balance_loss

Variant = Literal["alora", "hydralora", "lora"]
VARIANTS: tuple[Variant, ...] = ("alora", "hydralora", "lora")


def factor_counts(variant: Variant, num_adapters: int) -> tuple[int, int]:
    """(number of A matrices, number of B matrices) of a variant with N adapters."""
    if variant == "alora":
        return num_adapters, 1
    if variant == "hydralora":
        return 1, num_adapters
    return 1, 1


def has_router(num_adapters: int, routing: RoutingSpec) -> bool:
    return num_adapters > 1 and routing.mode == "soft"


def expected_parameter_count(variant: Variant, num_adapters: int, r: int, d_in: int, d_out: int, routing: RoutingSpec) -> int:
    """Trainable parameters of one layer, from the formulas (the tests compare with the module)."""
    num_a, num_b = factor_counts(variant, num_adapters)
    router = num_adapters * d_in if has_router(num_adapters, routing) else 0
    return num_a * r * d_in + num_b * d_out * r + router


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a routed mixture of low-rank adapters (see the module docstring)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        variant: Variant,
        num_adapters: int,
        r: int,
        alpha: float,
        routing: RoutingSpec = RoutingSpec(),
        context: RoutingContext | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_adapters < 1 or r < 1:
            raise ValueError(f"need num_adapters >= 1 and r >= 1, got {num_adapters} and {r}")
        if variant == "lora" and num_adapters != 1:
            raise ValueError("plain LoRA has exactly one adapter")
        self.base_layer = base_layer
        self.variant: Variant = variant
        self.num_adapters = num_adapters
        self.r = r
        self.scale = alpha / r
        self.routing = routing
        self.context = context if context is not None else RoutingContext()
        self.num_a, self.num_b = factor_counts(variant, num_adapters)
        d_out, d_in = base_layer.weight.shape
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.num_a, r, d_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.num_b, d_out, r, device=device))
        # skip_init: the generator below initialises it, and the global RNG stays untouched
        self.router = (
            nn.utils.skip_init(nn.Linear, d_in, num_adapters, bias=False, device=device)
            if has_router(num_adapters, routing)
            else None
        )
        #: the routing weights of the last forward, detached (None with a single adapter)
        self.last_weights: torch.Tensor | None = None
        self.reset_adapters(generator)

    @property
    def d_in(self) -> int:
        return self.base_layer.in_features

    @property
    def d_out(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_adapters(self, generator: torch.Generator | None = None) -> None:
        # A (num_A, r, d_in) initialised slice by slice: Kaiming on the 3-D tensor would take
        # r · d_in as the fan-in and draw every A_i too small.
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_B.zero_()
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5), generator=generator)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B] + ([self.router.weight] if self.router is not None else [])

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """(..., N) weights of each adapter per token; None for a single adapter."""
        if self.num_adapters == 1:
            return None
        ctx = self.context
        shape = (*x.shape[:-1], self.num_adapters)
        if ctx.override is not None:
            weights = ctx.override.to(device=x.device, dtype=torch.float32).expand(shape)
        elif self.routing.mode == "task_id":
            if ctx.task is None or not 0 <= ctx.task < self.num_adapters:
                raise RuntimeError(f"routing=task_id needs a task index in [0, {self.num_adapters}), got {ctx.task}")
            weights = F.one_hot(torch.tensor(ctx.task, device=x.device), self.num_adapters).float().expand(shape)
        else:
            assert self.router is not None
            # the softmax in float32 whatever the autocast dtype, so weights sum to 1
            probs = torch.softmax(self.router(x).float(), dim=-1)
            k = self.routing.top_k
            if k is not None and k < self.num_adapters:
                weights, selected = keep_top_k(probs, k)
            else:
                weights, selected = probs, F.one_hot(probs.argmax(-1), self.num_adapters).bool()
                k = 1
            if self.routing.balance_loss > 0 and self.training and torch.is_grad_enabled():
                ctx.balance_terms.append(switch_balance_loss(probs, selected, k, ctx.mask_for(probs)))
        if ctx.recorder is not None and ctx.task is not None:
            ctx.recorder.add(ctx.task, weights, ctx.mask_for(weights))
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        weights = self.routing_weights(x)
        self.last_weights = None if weights is None else weights.detach()
        # u[..., i, :] = A_i x for every A at once: one (num_A · r) × d_in product
        u = F.linear(x, self.lora_A.reshape(-1, self.d_in)).unflatten(-1, (self.num_a, self.r))
        if weights is None:
            delta = F.linear(u[..., 0, :], self.lora_B[0])
        elif self.num_b == 1:  # ALoRA: B (Σ_i g_i A_i x)
            mixed = (weights.to(u.dtype).unsqueeze(-1) * u).sum(-2)
            delta = F.linear(mixed, self.lora_B[0])
        else:  # HydraLoRA: Σ_i g_i B_i (A x) = [B_1 … B_N] (g ⊗ A x)
            spread = (weights.to(u.dtype).unsqueeze(-1) * u).flatten(-2)
            stacked_b = self.lora_B.permute(1, 0, 2).reshape(self.d_out, self.num_b * self.r)
            delta = F.linear(spread, stacked_b)
        return result + self.scale * delta

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, adapters={self.num_adapters}, r={self.r}, scale={self.scale:g}, "
            f"routing={self.routing.mode}, top_k={self.routing.top_k}"
        )
