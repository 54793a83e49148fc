"""The method interface: what a client trains, uploads and keeps, and how the server combines.

A method never touches a model, a data loader or a network. It maps tensor dictionaries
(:mod:`fedtune.state`) to tensor dictionaries, so the simulator, the Flower app and the
unit tests all drive the same object. One round, for a sampled client k:

    received = method.download(server, k)                 # server -> client (bytes_down)
    start    = method.client_start(received, local_k, initial_k, k)
    trained  = <runtime trains the keys where method.trains(key)>
    upload, local_k = method.client_finish(trained, start)  # client -> server (bytes_up)
    server   = method.aggregate(server, [ClientUpload(k, n_k, upload), ...])

``initial_k`` is the client's initial trainable state (LoRA init, head init). Clients can
rebuild it from the run seed, so it never has to cross the wire.

Most methods differ only in *where each role lives*: shared (sent and averaged), local
(stays on the client), or frozen (never trained). :class:`RoleSharingMethod` implements
that once; a method family that aggregates differently overrides ``aggregate``.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from fedtune.state import (
    ROLE_BASE,
    ROLE_HEAD,
    State,
    clone,
    is_bookkeeping,
    role_of,
    weighted_average,
    without_bookkeeping,
)

Placement = Literal["shared", "local", "frozen"]
HeadPlacement = Literal["shared", "local", "frozen"]


@dataclass(frozen=True)
class ClientUpload:
    """One client's reply: who, how much data (for p_k), and the tensors it sent."""

    client_id: int
    num_examples: int
    tensors: State
    info: Mapping[str, Any] = field(default_factory=dict)


def data_weights(uploads: Sequence[ClientUpload]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that replied this round."""
    total = sum(u.num_examples for u in uploads)
    if total <= 0:
        raise ValueError("clients reported no training examples")
    return [u.num_examples / total for u in uploads]


class LocalHooks:
    """Hooks a method can put into a client's local training loop (all optional).

    Created per client turn by :meth:`FederatedMethod.local_hooks`; ``extras()`` returns
    tensors the hooks computed (importance scores, say), which reach ``client_finish``
    merged into the trained state.
    """

    def extra_loss(self, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor | None:
        return None

    def after_backward(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Gradients are populated; the optimizer has not stepped yet."""

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """The optimizer has stepped."""

    def extras(self) -> State:
        return {}


class FederatedMethod(ABC):
    """Base class: one federated fine-tuning algorithm as pure tensor functions."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: True: clients train LoRA adapters (+ head); False: clients train base weights.
    uses_lora: ClassVar[bool] = True
    #: clients may have different LoRA ranks (config ``ranks``)
    supports_heterogeneous_ranks: ClassVar[bool] = False
    #: the model structure clients train: peft LoRA, full weights, or a method's own layer
    adapter_kind: str = "lora"
    #: also bind the target modules' own weights (methods that merge into them)
    binds_base_weights: ClassVar[bool] = False
    #: what a run exports: a PEFT ``adapter``, the whole ``model``, or ``merged`` target weights
    export_format: ClassVar[str] = "adapter"
    #: the aggregate is a p-weighted mean of the uploads, so central DP's "clip each update,
    #: noise the mean" is well defined
    aggregates_by_mean: ClassVar[bool] = False
    #: why a server optimiser (FedAdam, ...) has no meaning for this method (None: it has)
    server_opt_refusal: ClassVar[str | None] = None

    def __init__(self, head: HeadPlacement = "shared") -> None:
        if head not in ("shared", "local", "frozen"):
            raise ValueError(f"head must be shared, local or frozen, not {head!r}")
        self.head = head

    @classmethod
    def from_config(cls, config: Any) -> FederatedMethod:
        """Build from a :class:`fedtune.config.RunConfig`; methods with options override."""
        return cls(head=config.head)

    # -- where each key lives ------------------------------------------------------------
    def placement(self, key: str) -> Placement:
        raise NotImplementedError

    def trains(self, key: str) -> bool:
        return self.placement(key) != "frozen"

    def is_shared(self, key: str) -> bool:
        return self.placement(key) == "shared"

    def is_local(self, key: str) -> bool:
        return self.placement(key) == "local"

    @property
    def has_local_parts(self) -> bool:
        """Whether clients keep personal tensors (then personalised evaluation applies)."""
        return self.head == "local"

    def model_rank(self, client_id: int) -> int | None:
        """The LoRA rank of the adapter client ``client_id`` holds (None: its resource rank)."""
        return None

    # -- the round -----------------------------------------------------------------------
    def server_init(self, initial: State) -> State:
        """The server's state before round 1, from the (shared-seed) initial state."""
        return clone({k: v for k, v in initial.items() if self.is_shared(k)})

    def client_init(self, initial: State) -> State:
        """A client's local state before it first trains."""
        return clone({k: v for k, v in initial.items() if self.is_local(k)})

    def download(self, server: State, client_id: int) -> State:
        """What the server sends client ``client_id`` (counted as bytes_down)."""
        return {k: v for k, v in server.items() if self.is_shared(k) and not is_bookkeeping(k)}

    def client_start(self, received: State, local: State, initial: State, client_id: int) -> State:
        """The full trainable state the client starts local training from."""
        start = dict(initial)
        start.update(local)
        start.update(received)
        return clone(start)

    def personal_state(self, received: State, local: State, initial: State, client_id: int) -> State:
        """The client's own model for personalised evaluation."""
        return self.client_start(received, local, initial, client_id)

    def client_finish(self, trained: State, start: State) -> tuple[State, State]:
        """Split the trained state into (upload, new local state)."""
        upload = {k: v for k, v in trained.items() if self.is_shared(k)}
        local = {k: v for k, v in trained.items() if self.is_local(k)}
        return upload, local

    def check_upload(self, upload: State, received: State, client_id: int) -> str | None:
        """Method-specific rules an upload must follow beyond keys, shapes, dtypes and finite
        values (which the server checks against :meth:`client_finish`'s output); None if it
        does, else the reason (one line). Called only on uploads that passed those checks."""
        return None

    def aggregate(self, server: State, uploads: Sequence[ClientUpload]) -> State:
        """FedAvg of every uploaded tensor with p_k; keys nobody sent keep their value."""
        if not uploads:
            return dict(server)
        averaged = weighted_average([u.tensors for u in uploads], data_weights(uploads))
        new_server = dict(server)
        new_server.update(averaged)
        return new_server

    def global_state(self, server: State, initial: State) -> State:
        """The model a new client would get: the server's tensors over the initial ones."""
        state = dict(initial)
        state.update(without_bookkeeping(server))
        return state

    def export_state(self, state: State) -> State:
        """A state as plain LoRA factors (+ head) for PEFT export; methods with their own
        layer structure convert here."""
        return state

    # -- local optimisation --------------------------------------------------------------
    def local_hooks(self, start: State, local: State) -> LocalHooks | None:
        """Hooks for this client's local training (None: plain training)."""
        return None

    def make_optimizer(
        self,
        params: Mapping[str, torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        matrix_keys: frozenset[str] = frozenset(),
    ) -> torch.optim.Optimizer:
        """The client's optimizer over the trainable ``params`` (fresh every round).

        ``matrix_keys`` names the weight matrices of linear layers (not heads or
        embeddings), for optimizers that treat them specially (GaLore).
        """
        return torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)


class RoleSharingMethod(FederatedMethod):
    """A method defined by which LoRA factors are shared, kept local or frozen.

    The task head (any non-LoRA trainable key) follows the run's ``head`` setting.
    """

    shared_roles: ClassVar[frozenset[str]] = frozenset()
    local_roles: ClassVar[frozenset[str]] = frozenset()
    frozen_roles: ClassVar[frozenset[str]] = frozenset()
    aggregates_by_mean = True

    def placement(self, key: str) -> Placement:
        role = role_of(key, self.uses_lora)
        if role == ROLE_HEAD:
            return self.head
        if role in self.local_roles:
            return "local"
        if role in self.shared_roles:
            return "shared"
        if role in self.frozen_roles or role == ROLE_BASE:
            return "frozen"
        return "shared"

    @property
    def has_local_parts(self) -> bool:
        return bool(self.local_roles) or self.head == "local"
