"""FlexLoRA (Bai et al. NeurIPS 2024): full-update averaging, SVD redistribution to each rank.

The server forms W_g = sum_k p_k s_k B_k A_k per module, takes its SVD W_g = U S V^T and
gives client k the best rank-r_k approximation at the client's own scale s_k:
B = U[:, :r_k] S[:r_k] / s_k, A = V^T[:r_k, :], so that s_k B A = the rank-r_k truncation.

W_g has rank <= R = sum_k r_k, so its SVD never needs the d_out x d_in matrix: with the
stacked factors P = [p_1 s_1 B_1, ..., p_K s_K B_K] (d_out x R) and Q = [A_1; ...; A_K]
(R x d_in), W_g = P Q. QR-factorise P = Q_p R_p and Q^T = Q_q R_q; then
W_g = Q_p (R_p R_q^T) Q_q^T, and the SVD of the R x R core R_p R_q^T = U_c S V_c^T gives
U = Q_p U_c, V = Q_q V_c: O((d_in + d_out) R^2 + R^3) time and O((d_in + d_out) R) memory.
``dense_reference_svd`` keeps the direct computation for tests.

The server stores the top r_max components as unscaled factors (B_g = U S, A_g = V^T), in
singular-value order, so truncating them to r_k *is* the best rank-r_k approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.methods.base import ClientUpload, FederatedMethod, HeadPlacement, Placement, data_weights
from fedtune.methods.registry import register
from fedtune.resources import RankPlan
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, ROLE_HEAD, State, lora_modules, role_of, weighted_average


def stacked_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """P = [c_1 B_1, ..., c_K B_K] and Q = [A_1; ...; A_K], so that P Q = sum_k c_k B_k A_k."""
    p = torch.cat([c * b for c, b in zip(coefficients, bs)], dim=1)
    q = torch.cat(list(as_), dim=0)
    return p, q


def low_rank_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD (U, S, V^T) of P Q without forming P Q (QR of each side, SVD of the core)."""
    q_p, r_p = torch.linalg.qr(p)  # d_out x R, R x R
    q_q, r_q = torch.linalg.qr(q.T)  # d_in x R, R x R
    u_c, s, vh_c = torch.linalg.svd(r_p @ r_q.T)
    k = min(rank, s.shape[0])
    return q_p @ u_c[:, :k], s[:k], (q_q @ vh_c[:k].T).T


def dense_reference_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same by forming the d_out x d_in matrix (for tests and the benchmark's baseline)."""
    u, s, vh = torch.linalg.svd(p @ q, full_matrices=False)
    k = min(rank, s.shape[0])
    return u[:, :k], s[:k], vh[:k]


@register
class FlexLoRA(FederatedMethod):
    name = "flexlora"
    summary = "FlexLoRA: weighted full-update averaging, SVD redistribution to each client's rank (fast QR path)"
    supports_heterogeneous_ranks = True
    server_opt_refusal = "its server state is the SVD of the averaged update, redistributed each round, not an average a pseudo-gradient could move"

    def __init__(self, plan: RankPlan, head: HeadPlacement = "shared", dense: bool = False) -> None:
        super().__init__(head=head)
        self.plan = plan
        self.dense = dense

    @classmethod
    def from_config(cls, config: Any) -> FlexLoRA:
        return cls(RankPlan.from_config(config), config.head)

    def placement(self, key: str) -> Placement:
        return self.head if role_of(key) == ROLE_HEAD else "shared"

    def server_init(self, initial: State) -> State:
        """The initial LoRA at r_max, stored unscaled (B_g = s_max B_0)."""
        server = super().server_init(initial)
        s_max = self.plan.scale(self.plan.server_rank)
        for module in lora_modules(server):
            server[module + LORA_B_SUFFIX] = s_max * server[module + LORA_B_SUFFIX]
        return server

    def _at_rank(self, server: State, rank: int) -> State:
        scale = self.plan.scale(rank)
        state = {k: v for k, v in server.items() if self.is_shared(k) and role_of(k) == ROLE_HEAD}
        for module in lora_modules(server):
            state[module + LORA_A_SUFFIX] = server[module + LORA_A_SUFFIX][:rank].clone()
            state[module + LORA_B_SUFFIX] = server[module + LORA_B_SUFFIX][:, :rank] / scale
        return state

    def download(self, server: State, client_id: int) -> State:
        return self._at_rank(server, self.plan.client_ranks[client_id])

    def global_state(self, server: State, initial: State) -> State:
        state = dict(initial)
        state.update(self._at_rank(server, self.plan.server_rank))
        return state

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        p = data_weights(uploads)
        svd = dense_reference_svd if self.dense else low_rank_svd
        new = dict(server)
        r_max = self.plan.server_rank
        for module in lora_modules(uploads[0].tensors):
            a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            bs = [u.tensors[b_key] for u in uploads]
            as_ = [u.tensors[a_key] for u in uploads]
            coefficients = [p_k * self.plan.scale(a.shape[0]) for p_k, a in zip(p, as_)]
            u, s, vh = svd(*stacked_factors(bs, as_, coefficients), r_max)
            b_g = torch.zeros((u.shape[0], r_max), dtype=u.dtype)
            a_g = server[a_key].clone()  # rows beyond rank(W_g) keep their previous directions
            b_g[:, : s.shape[0]] = u * s
            a_g[: s.shape[0]] = vh
            new[a_key], new[b_key] = a_g, b_g
        heads = [{k: v for k, v in u.tensors.items() if role_of(k) == ROLE_HEAD and self.is_shared(k)} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, p))
        return new
