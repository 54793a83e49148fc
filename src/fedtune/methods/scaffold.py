"""SCAFFOLD (Karimireddy et al., ICML 2020) around any mean-aggregating method.

Server control c and client controls c_k (zero at start) per tensor the clients train and
share. A client corrects every local gradient, g <- g - c_k + c, and after its K local steps
sets its new control c_k+ to an estimate of its own gradient. It uploads the method's usual
tensors plus Delta c_k = c_k+ - c_k; the server aggregates the model as the method does (a
global step size of 1: FedIT's mean of y) and sets c <- c + (1/N) sum_S Delta c_k over the
replies S of the round, N the number of clients.

The estimate (``scaffold.control``):
- ``mean-gradient`` (default): the mean of the client's uncorrected minibatch gradients over
  its K steps. With plain SGD this *is* the paper's option II, since y = x - lr sum_t
  (g_t - c_k + c) gives c_k - c + (x - y) / (K lr) = mean_t g_t; unlike option II it stays
  in gradient units under an adaptive optimizer.
- ``option-ii``: the paper's formula, c_k+ = c_k - c + (x - y) / (K lr), x the model received,
  y the model trained, lr the run's rate. Under AdamW (fedtune's default optimizer) x - y is
  in Adam's units (about lr per coordinate per step, whatever the gradient's size), so c_k
  comes out near 1 per coordinate, not a gradient, and the correction c - c_k can swamp the
  gradient it corrects. On 20NG/MiniLM (optimisers study, Dirichlet 0.1, seed 0) FedIT +
  SCAFFOLD with option II ended at 8.0 % global accuracy, where FedAvg reached 46.4 %: its
  training loss rose from 2.25 in round 1 to 3.9 once the correction came in. Kept for SGD
  users and to reproduce that.

Choices the paper leaves open here:
- which tensors: those the wrapped method trains *and* shares (FedIT's A, B, head; FFA-LoRA's
  B; FedSA-LoRA's A; full weights). Personal tensors need no correction toward a global model.
- with an adaptive optimizer (AdamW, fedtune's default) the corrected gradient goes through
  its preconditioner, as any gradient does.
- c travels down with every download and Delta c_k up with every upload: both are in the
  counted bytes (SCAFFOLD's known cost, twice the shared tensors per direction).

Only methods whose aggregate is the mean of the uploads (``aggregates_by_mean``) compose with
it: with heterogeneous ranks, stacking or SVD redistribution there is no one tensor per key
for c to correct toward. Central DP is refused with it: Delta c_k would go unclipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.errors import UsageError
from fedtune.methods.base import ClientUpload, FederatedMethod, LocalHooks, Placement
from fedtune.methods.client_corrections import Combined
from fedtune.state import State, is_bookkeeping

SERVER_C = "_scaffold.c."  # the server's c, per key (bookkeeping: never averaged or optimised)
CLIENT_C = "_scaffold.ck."  # a client's own c_k, kept in its local state
SENT_C = "scaffold.c."  # c as it travels down
DELTA_C = "scaffold.delta_c."  # Delta c_k as it travels up
STEPS = "_scaffold.steps"
MEAN_GRAD = "_scaffold.mean_grad."  # the mean uncorrected gradient, per key (the mean-gradient estimate)


class ScaffoldSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    control: Literal["mean-gradient", "option-ii"] = Field(
        "mean-gradient",
        description="a client's new control: the mean of its uncorrected gradients (option II's value under SGD, "
        "and in gradient units under AdamW), or the paper's option II from the displacement (x - y) / (K lr)",
    )


class _Correction(LocalHooks):
    """g <- g - c_k + c on the corrected keys; counts the optimizer steps taken and sums the
    uncorrected gradients (in float32 at least, so a bf16 run's sum does not lose the small ones)."""

    def __init__(self, correction: Mapping[str, torch.Tensor], sum_gradients: bool) -> None:
        self.correction = correction
        self.steps = 0
        self.gradient_sums: dict[str, torch.Tensor] | None = {} if sum_gradients else None

    def after_backward(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for key, value in self.correction.items():
            grad = params[key].grad
            if grad is None:
                continue
            if self.gradient_sums is not None:
                raw = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
                total = self.gradient_sums.get(key)
                self.gradient_sums[key] = raw.clone() if total is None else total.add_(raw)
            grad.add_(value.to(device=grad.device, dtype=grad.dtype))

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.steps += 1

    def extras(self) -> State:
        out: State = {STEPS: torch.tensor(self.steps)}
        if self.gradient_sums is not None and self.steps > 0:
            out.update({MEAN_GRAD + k: (v / self.steps).cpu() for k, v in self.gradient_sums.items()})
        return out


def _split(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[State, State]:
    """(the keys without ``prefix``, {key minus prefix: value} for the ones with it)."""
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return rest, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class Scaffold(FederatedMethod):
    """``inner`` with SCAFFOLD's control variates (see the module docstring)."""

    def __init__(self, inner: FederatedMethod, lr: float, clients: int, control: str = "mean-gradient") -> None:
        super().__init__(head=inner.head)
        self.inner, self.lr, self.clients, self.control = inner, lr, clients, control
        self.name = f"{inner.name}+scaffold"  # type: ignore[misc]
        self.summary = f"{inner.summary}; SCAFFOLD control variates"  # type: ignore[misc]
        for attr in ("uses_lora", "supports_heterogeneous_ranks", "adapter_kind", "binds_base_weights", "export_format", "server_opt_refusal"):
            setattr(self, attr, getattr(inner, attr))

    @classmethod
    def wrap(cls, inner: FederatedMethod, config: Any) -> Scaffold:
        if not inner.aggregates_by_mean:
            raise UsageError(f"scaffold needs a method whose aggregate is the mean of the uploads, not {inner.name}")
        if config.dp.noise_multiplier > 0:
            raise UsageError("scaffold with central DP is not supported: the control-variate uploads would go unclipped and unnoised")
        return cls(inner, config.lr, config.clients, config.scaffold.control)

    # -- where each key lives: the wrapped method's rules ------------------------------------
    def placement(self, key: str) -> Placement:
        return self.inner.placement(key)

    def trains(self, key: str) -> bool:
        return self.inner.trains(key)

    @property
    def has_local_parts(self) -> bool:
        return self.inner.has_local_parts

    def model_rank(self, client_id: int) -> int | None:
        return self.inner.model_rank(client_id)

    def corrected_keys(self, server: State) -> list[str]:
        return [k for k in server if not is_bookkeeping(k) and self.inner.trains(k) and self.inner.is_shared(k)]

    # -- the round -----------------------------------------------------------------------
    def server_init(self, initial: State) -> State:
        server = self.inner.server_init(initial)
        server.update({SERVER_C + k: torch.zeros_like(server[k]) for k in self.corrected_keys(server)})
        return server

    def client_init(self, initial: State) -> State:
        return self.inner.client_init(initial)

    def download(self, server: State, client_id: int) -> State:
        inner_server, c = _split(server, SERVER_C)
        payload = self.inner.download(inner_server, client_id)
        payload.update({SENT_C + k: v for k, v in c.items()})
        return payload

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        received, c = _split(received, SENT_C)
        local, c_k = _split(local, CLIENT_C)
        start = self.inner.client_start(received, local, initial, client_id)
        start.update({SERVER_C + k: v.clone() for k, v in c.items()})
        start.update({CLIENT_C + k: c_k.get(k, torch.zeros_like(v)).clone() for k, v in c.items()})
        return start

    def personal_state(self, received: State, local: State, initial: State, client_id: int) -> State:
        return self.inner.personal_state(_split(received, SENT_C)[0], _split(local, CLIENT_C)[0], initial, client_id)

    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        _, c = _split(start, SERVER_C)
        _, c_k = _split(start, CLIENT_C)
        inner_start = {k: v for k, v in start.items() if not k.startswith(("_scaffold.",))}
        inner_local = _split(local, CLIENT_C)[0]
        # the correction first, so a method's own masks (frozen parts) still apply after it
        correction = _Correction({k: c[k] - c_k[k] for k in c}, sum_gradients=self.control == "mean-gradient")
        return Combined(correction, self.inner.local_hooks(inner_start, inner_local))

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        _, c = _split(start, SERVER_C)
        _, c_k = _split(start, CLIENT_C)
        steps = int(trained.get(STEPS, torch.tensor(0)))
        inner_trained = {k: v for k, v in trained.items() if not k.startswith("_scaffold.")}
        inner_start = {k: v for k, v in start.items() if not k.startswith("_scaffold.")}
        upload, local = self.inner.client_finish(inner_trained, inner_start)
        new_c_k = {}
        for key in c:
            if steps > 0 and self.control == "mean-gradient":
                # a key whose gradient never came (unused this turn) had gradient 0 throughout
                mean = trained.get(MEAN_GRAD + key)
                new_c_k[key] = torch.zeros_like(c_k[key]) if mean is None else mean.to(c_k[key].dtype)
            elif steps > 0:
                new_c_k[key] = c_k[key] - c[key] + (start[key] - trained[key]) / (steps * self.lr)
            else:  # no step, no estimate: the control stays
                new_c_k[key] = c_k[key].clone()
            upload[DELTA_C + key] = new_c_k[key] - c_k[key]
        local.update({CLIENT_C + k: v for k, v in new_c_k.items()})
        return upload, local

    def check_upload(self, upload: State, received: State, client_id: int) -> str | None:
        return self.inner.check_upload(_split(upload, DELTA_C)[0], _split(received, SENT_C)[0], client_id)

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        inner_server, c = _split(server, SERVER_C)
        if not uploads:
            return dict(server)
        model_uploads, deltas = [], []
        for u in uploads:
            tensors, delta = _split(u.tensors, DELTA_C)
            model_uploads.append(ClientUpload(u.client_id, u.num_examples, tensors))
            deltas.append(delta)
        new = self.inner.aggregate(inner_server, model_uploads)
        for key, value in c.items():
            total = torch.zeros_like(value, dtype=torch.float64)
            for delta in deltas:
                total += delta[key].double()
            new[SERVER_C + key] = (value.double() + total / self.clients).to(value.dtype)
        return new

    def global_state(self, server: State, initial: State) -> State:
        return self.inner.global_state(_split(server, SERVER_C)[0], initial)

    def export_state(self, state: State) -> State:
        return self.inner.export_state(state)

    def make_optimizer(self, params, lr, weight_decay, matrix_keys=frozenset()):  # type: ignore[no-untyped-def]
        return self.inner.make_optimizer(params, lr, weight_decay, matrix_keys)
