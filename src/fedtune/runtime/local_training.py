"""One client's local training: a plain PyTorch loop over pre-tokenised examples.

Deliberately not ``transformers.Trainer``: a federated round runs this loop hundreds of
times, and Trainer's per-call set-up (accelerator, callbacks, logging) would dominate the
few steps each client takes. The loop is what a plain PyTorch/peft script would do, so the
simulator's throughput matches one (checked by ``make bench``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.data.encode import Batch, Example, collate
from fedtune.methods.base import LocalHooks


@dataclass
class LocalResult:
    loss: float
    steps: int
    examples: int
    tokens: int
    #: seconds inside forward, backward and optimizer steps (the "useful" work)
    compute_seconds: float
    #: training memory beyond the frozen model: trainable values + gradients + optimizer state
    train_state_bytes: int = 0


def steps_for(num_examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> int:
    if local_epochs is not None:
        return max(1, math.ceil(local_epochs * num_examples / batch_size))
    return int(local_steps or 1)


def batches(
    examples: Sequence[Example], batch_size: int, steps: int, generator: torch.Generator, pad_id: int
) -> Iterator[Batch]:
    """``steps`` batches, reshuffling at each pass over the client's examples."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, len(examples)):
            order += torch.randperm(len(examples), generator=generator).tolist()
        take, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in take], pad_id)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware (Linux's CPU flags; elsewhere no).

    Without them bf16 autocast only adds conversions around fp32 arithmetic, so it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` computes bf16 natively, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    out = model(**batch.model_inputs(), labels=batch.labels)
    return out.loss


def train_locally(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    max_grad_norm: float | None = None,
    hooks: LocalHooks | None = None,
    on_step: Callable[[], None] | None = None,
) -> LocalResult:
    model.train()
    trainable = list(params.values())
    total_loss, total_examples, total_tokens, compute = 0.0, 0, 0, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch in batches(examples, batch_size, steps, generator, pad_id):
        batch = batch.to(device)
        start = time.perf_counter()
        with autocast(device, precision):
            loss = forward_loss(model, batch)
            extra = hooks.extra_loss(params) if hooks is not None else None
        (loss if extra is None else loss + extra).backward()
        if hooks is not None:
            hooks.after_backward(params)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hooks is not None:
            hooks.after_step(params)
        sync()
        compute += time.perf_counter() - start
        total_loss += float(loss.detach())
        total_examples += batch.size
        total_tokens += batch.num_tokens
        if on_step is not None:
            on_step()
    model.eval()
    memory = 2 * sum(p.numel() * p.element_size() for p in trainable) + optimizer_state_bytes(optimizer)
    return LocalResult(total_loss / max(steps, 1), steps, total_examples, total_tokens, compute, memory)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (GaLore's projection matrices included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            tensor = getattr(value, "ortho_matrix", value)  # GaLore keeps its projector in an object
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
