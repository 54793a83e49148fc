"""Exact aggregation by freezing one factor per round: RoLoRA and FedSVD (homogeneous ranks).

When every client holds the same frozen factor, averaging the trained one is exact:
s (sum p_k B_k) A = sum p_k s B_k A. FFA-LoRA freezes A forever; these two move it.

- **RoLoRA** (arXiv 2502.01755) alternates by round: odd rounds freeze A and train/average B,
  even rounds freeze B and train/average A. Each round uploads only the trained factor (and
  the head). Round 1 trains B, since B starts at zero and A's gradient is then zero.
- **FedSVD** (arXiv 2505.12805): clients train and upload only B (A frozen for the round);
  the server forms M = B_bar A and re-factorises it by its rank-r SVD, M = U S V^T:
  A <- V^T[:r] (orthonormal rows), B <- U[:, :r] S[:r], so B A = M. Clients receive both.
  Each singular pair's sign is pinned (v_i's largest entry positive) so a run is reproducible.
  The SVD comes from QR factorisations of B_bar and A^T (FlexLoRA's fast path), never
  forming the d_out x d_in matrix.

The frozen factor is still downloaded (it changes between rounds) and is kept frozen by
gradient masks and restored after every optimizer step, as HAFL's frozen components are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.methods.base import ClientUpload, FederatedMethod, LocalHooks, Placement, data_weights
from fedtune.methods.flexlora import low_rank_svd
from fedtune.methods.registry import register
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, ROLE_A, ROLE_B, ROLE_HEAD, State, lora_modules, role_of, weighted_average

ROUND_KEY = "_frozen_factor.round"
#: sent with the download (an int32 scalar): 0 = train B (A frozen), 1 = train A (B frozen);
#: the client keeps it as bookkeeping (``_`` + this) between start and finish
PHASE = "frozen_factor.trains"
PHASE_KEY = "_" + PHASE


class _Freeze(LocalHooks):
    """Zero the frozen keys' gradients; put their values back after every step."""

    def __init__(self, frozen: Mapping[str, torch.Tensor]) -> None:
        self.frozen = {k: v.detach().clone() for k, v in frozen.items()}

    def after_backward(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for key in self.frozen:
            if params[key].grad is not None:
                params[key].grad.zero_()

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for key, value in self.frozen.items():
                params[key].copy_(value.to(params[key].device))


class _FrozenFactorMethod(FederatedMethod):
    """Both factors shared and downloaded; one of them trains per round (``trained_role``)."""

    server_opt_refusal = (
        "one factor is frozen each round (and FedSVD re-factorises both), so a server moment would move "
        "the factor the clients were told is fixed"
    )

    def placement(self, key: str) -> Placement:
        return self.head if role_of(key) == ROLE_HEAD else "shared"

    def trained_role(self, round_num: int) -> str:
        raise NotImplementedError

    def server_init(self, initial: State) -> State:
        server = super().server_init(initial)
        server[ROUND_KEY] = torch.tensor(1)  # the round about to be trained
        return server

    def download(self, server: State, client_id: int) -> State:
        payload = super().download(server, client_id)
        payload[PHASE] = torch.tensor(int(self.trained_role(int(server[ROUND_KEY])) == ROLE_A), dtype=torch.int32)
        return payload

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        phase = received[PHASE]
        start = super().client_start({k: v for k, v in received.items() if k != PHASE}, local, initial, client_id)
        start[PHASE_KEY] = phase.clone()
        return start

    def _frozen_role(self, state: State) -> str:
        return ROLE_B if int(state[PHASE_KEY]) == 1 else ROLE_A

    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        frozen = self._frozen_role(start)
        return _Freeze({k: v for k, v in start.items() if not k.startswith("_") and role_of(k) == frozen})

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        frozen = self._frozen_role(start)
        upload = {k: v for k, v in trained.items() if not k.startswith("_") and self.is_shared(k) and role_of(k) != frozen}
        local = {k: v for k, v in trained.items() if not k.startswith("_") and self.is_local(k)}
        return upload, local

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        new = dict(server)
        new.update(weighted_average([u.tensors for u in uploads], data_weights(uploads)))
        new[ROUND_KEY] = server[ROUND_KEY] + 1
        return new


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_i, v_i) so v_i's largest-magnitude entry is positive.

    The SVD fixes each pair only up to a joint sign, and LAPACK builds may pick differently;
    the sign changes what the next round trains from (an SGD step is not sign-equivariant
    once weight decay or noise enters), so it is pinned here."""
    pivot = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, pivot)).squeeze(1)
    sign[sign == 0] = 1
    return u * sign, vh * sign[:, None]


@register
class RoLoRA(_FrozenFactorMethod):
    name = "rolora"
    summary = "RoLoRA: alternate rounds train/average B (A frozen) and A (B frozen); exact, one factor uploaded"

    def trained_role(self, round_num: int) -> str:
        return ROLE_B if round_num % 2 == 1 else ROLE_A


@register
class FedSVD(_FrozenFactorMethod):
    name = "fedsvd"
    summary = "FedSVD: train/average B with A frozen; the server re-factorises B_bar A by SVD (A orthonormal)"

    def trained_role(self, round_num: int) -> str:
        return ROLE_B

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        new = super().aggregate(server, uploads)
        if not uploads:
            return new
        for module in lora_modules(server):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            rank = server[a_key].shape[0]
            u, s, vh = low_rank_svd(new[b_key].double(), server[a_key].double(), rank)
            u, vh = canonical_signs(u, vh)
            a_new = server[a_key].double().clone()  # rows beyond rank(M) keep their directions
            b_new = torch.zeros_like(new[b_key], dtype=torch.float64)
            a_new[: s.shape[0]] = vh
            b_new[:, : s.shape[0]] = u * s
            new[a_key], new[b_key] = a_new.to(server[a_key].dtype), b_new.to(new[b_key].dtype)
        return new
