"""Fed-ALoRA: share B, keep A on each client (seed 000).

Seed 000 finds that the similarity of A matrices across clients comes from their identical
initialisation, while B carries the knowledge; so Fed-ALoRA averages B and keeps A local.

Open choice (``a_persistence``):
- ``reset``: every round each client restarts A from the shared init A0 (what the public
  reference code does); its last trained A_k is still kept for personalised evaluation.
- ``keep``: A_k persists across rounds (the reading of the paper).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fedtune.methods.base import HeadPlacement, RoleSharingMethod
from fedtune.methods.registry import register
from fedtune.state import ROLE_A, ROLE_B, State, role_of

APersistence = Literal["reset", "keep"]


class FedALoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a_persistence: APersistence = "reset"


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

    @classmethod
    def from_config(cls, config: Any) -> FedALoRA:
        return cls(head=config.head, a_persistence=config.fed_alora.a_persistence)

    def client_start(self, received: State, local: State, initial: State) -> State:
        if self.a_persistence == "keep":
            return super().client_start(received, local, initial)
        # reset: A restarts from the shared init; only non-A local parts (a local head) carry over.
        carried = {k: v for k, v in local.items() if role_of(k) != ROLE_A}
        return super().client_start(received, carried, initial)

    def personal_state(self, received: State, local: State, initial: State) -> State:
        # Each client is evaluated with its own last A_k and the global B, in both modes.
        return super().client_start(received, local, initial)
