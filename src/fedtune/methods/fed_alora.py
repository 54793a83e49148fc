"""Fed-ALoRA: share B, keep A on each client (seed 000).

Seed 000 finds that the similarity of A matrices across clients comes from their identical
initialisation, while B carries the knowledge; so Fed-ALoRA averages B and keeps A local.

Open choice (``a_persistence``):
- ``reset``: every round each client restarts A from the shared init A0 (what the public
  reference code does); its last trained A_k is still kept for personalised evaluation.
- ``keep``: A_k persists across rounds (the reading of the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedtune.errors import UsageError
from fedtune.methods.base import ClientUpload, FederatedMethod, HeadPlacement, Placement, RoleSharingMethod, data_weights
from fedtune.methods.registry import register
from fedtune.resources import RankPlan
from fedtune.state import ROLE_A, ROLE_B, ROLE_HEAD, State, clone, role_of, weighted_average

APersistence = Literal["reset", "keep"]


class FedALoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    a_persistence: APersistence = "reset"
    #: inner width of the heterogeneous decomposition (B_base is d_out x d_m)
    d_m: int = Field(16, gt=0)
    #: auto: the decomposition when client ranks differ, plain Fed-ALoRA otherwise
    mode: Literal["auto", "homogeneous", "decomposed"] = "auto"


@register
class FedALoRA(RoleSharingMethod):
    name = "fed-alora"
    summary = "Fed-ALoRA: B averaged across clients, A kept personal (a_persistence=reset|keep)"
    shared_roles = frozenset({ROLE_B})
    local_roles = frozenset({ROLE_A})

    def __init__(self, head: HeadPlacement = "shared", a_persistence: APersistence = "reset") -> None:
        super().__init__(head=head)
        if a_persistence not in ("reset", "keep"):
            raise ValueError(f"a_persistence must be reset or keep, not {a_persistence!r}")
        self.a_persistence = a_persistence

    supports_heterogeneous_ranks = True  # by handing over to the decomposition

    @classmethod
    def from_config(cls, config: Any) -> FederatedMethod:
        mode = config.fed_alora.mode
        if mode == "decomposed" or (mode == "auto" and len(set(config.client_ranks)) > 1):
            return FedALoRADecomposed.from_config(config)
        if len(set(config.client_ranks)) > 1:
            raise UsageError("fed_alora.mode=homogeneous needs equal client ranks")
        return cls(head=config.head, a_persistence=config.fed_alora.a_persistence)

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        if self.a_persistence == "keep":
            return super().client_start(received, local, initial, client_id)
        # reset: A restarts from the shared init; only non-A local parts (a local head) carry over.
        carried = {k: v for k, v in local.items() if role_of(k) != ROLE_A}
        return super().client_start(received, carried, initial, client_id)

    def personal_state(self, received: State, local: State, initial: State, client_id: int) -> State:
        # Each client is evaluated with its own last A_k and the global B, in both modes.
        return super().client_start(received, local, initial, client_id)


# -- heterogeneous ranks: the decomposition ----------------------------------------------------
# Each client has A_k (r_k x d_in), M_k (d_m x r_k), B_k1 (r_k x d_m), B_k2 (d_out x r_k) and a
# frozen shared B_base (d_out x d_m); h = W0 x + s (B_base + B_k2 B_k1) M_k A_k x (see
# models/decomposed.py). Clients upload B_k1 and B_k2; the server folds them into B_base:
# B_base <- B_base + sum_k p_k B_k2 B_k1, a d_out x d_m matrix whatever the ranks, and every
# client downloads the same B_base. As in the reference code, B1 (Kaiming) and B2 (zero)
# restart every round (their product now lives in B_base); A and M restart too with
# a_persistence=reset, or persist with keep.
# One rank scale: client k's layer applies s_k = s(r_k) to B_base + B2 B1, so a B_base shared
# as is would be read 4x weaker by a rank-8 client than the rank-2 client that trained it.
# The server's B_base is at s(r_max): client k receives B_base * s(r_max) / s(r_k) and the
# server folds s(r_k) / s(r_max) * B2 B1, so s_k * (what client k holds) is the same matrix
# for every client.
M_KEY, B1_KEY, B2_KEY, B_BASE_KEY = ".alora_M", ".alora_B1", ".alora_B2", ".alora_B_base"


def _suffix(key: str) -> str:
    return "." + key.rsplit(".", 1)[1]


@register
class FedALoRADecomposed(FederatedMethod):
    """Fed-ALoRA for heterogeneous ranks (selected by ``fed-alora`` when client ranks differ)."""

    name = "fed-alora-decomposed"
    summary = "Fed-ALoRA for heterogeneous ranks: shared B_base + client B2 B1, M, A (chosen automatically)"
    supports_heterogeneous_ranks = True
    adapter_kind = "decomposed"

    def __init__(self, head: HeadPlacement = "shared", a_persistence: APersistence = "reset", plan: RankPlan | None = None) -> None:
        super().__init__(head=head)
        self.a_persistence = a_persistence
        self.plan = plan

    @classmethod
    def from_config(cls, config: Any) -> FedALoRADecomposed:
        return cls(head=config.head, a_persistence=config.fed_alora.a_persistence, plan=RankPlan.from_config(config))

    def _to_client_scale(self, client_id: int) -> float:
        return 1.0 if self.plan is None else self.plan.to_client_scale(self.plan.client_ranks[client_id])

    def _to_server_scale(self, client_id: int) -> float:
        return 1.0 if self.plan is None else self.plan.to_server_scale(self.plan.client_ranks[client_id])

    def placement(self, key: str) -> Placement:
        suffix = _suffix(key)
        if suffix in (".lora_A", M_KEY):
            return "local"
        if suffix in (B1_KEY, B2_KEY, B_BASE_KEY):
            return "shared"
        return self.head

    def trains(self, key: str) -> bool:
        return _suffix(key) != B_BASE_KEY and self.placement(key) != "frozen"

    @property
    def has_local_parts(self) -> bool:
        return True

    def server_init(self, initial: State) -> State:
        return clone({k: v for k, v in initial.items() if _suffix(k) == B_BASE_KEY or self.is_head_shared(k)})

    def is_head_shared(self, key: str) -> bool:
        return role_of(key) == ROLE_HEAD and _suffix(key) not in (M_KEY, B1_KEY, B2_KEY, B_BASE_KEY) and self.head == "shared"

    def download(self, server: State, client_id: int) -> State:
        factor = self._to_client_scale(client_id)
        return {k: v * factor if _suffix(k) == B_BASE_KEY else v for k, v in server.items()}

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        start = dict(initial)  # fresh B1 (Kaiming), B2 (zero) every round
        if self.a_persistence == "keep":
            start.update({k: v for k, v in local.items() if _suffix(k) in (".lora_A", M_KEY)})
        if self.head == "local":
            start.update({k: v for k, v in local.items() if self.placement(k) == "local" and role_of(k) == ROLE_HEAD})
        start.update(received)
        return clone(start)

    def personal_state(self, received: State, local: State, initial: State, client_id: int) -> State:
        state = dict(initial)
        state.update(local)
        state.update(received)
        return state

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        upload = {k: v for k, v in trained.items() if _suffix(k) in (B1_KEY, B2_KEY) or self.is_head_shared(k)}
        local = {k: v for k, v in trained.items() if self.placement(k) == "local"}
        return upload, local

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        if not uploads:
            return dict(server)
        p = data_weights(uploads)
        new = dict(server)
        for key in [k for k in server if _suffix(k) == B_BASE_KEY]:
            module = key[: -len(B_BASE_KEY)]
            update = sum(
                p_k * self._to_server_scale(u.client_id) * (u.tensors[module + B2_KEY].double() @ u.tensors[module + B1_KEY].double())
                for p_k, u in zip(p, uploads)
            )
            new[key] = (server[key].double() + update).to(server[key].dtype)
        heads = [{k: v for k, v in u.tensors.items() if self.is_head_shared(k)} for u in uploads]
        if heads[0]:
            new.update(weighted_average(heads, p))
        return new

    def export_state(self, state: State) -> State:
        """Plain LoRA factors: A, and B = (B_base + B2 B1) M, at the client's own rank and scale."""
        out = {k: v for k, v in state.items() if _suffix(k) not in (M_KEY, B1_KEY, B2_KEY, B_BASE_KEY)}
        for key in [k for k in state if k.endswith(".lora_A")]:
            module = key[: -len(".lora_A")]
            b_eff = (state[module + B_BASE_KEY] + state[module + B2_KEY] @ state[module + B1_KEY]) @ state[module + M_KEY]
            out[module + ".lora_B"] = b_eff
        return out
