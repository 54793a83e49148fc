"""Adversarial fuzzing of the server's reply handling, in-process and through the Flower strategy.

The contract (what a hardened server guarantees, whatever a client sends):

- ``FederatedServer.receive`` and ``FedtuneStrategy.aggregate_train`` never raise;
- every bad reply is rejected and counted: ``rejected_replies`` equals the number of bad
  replies of the round (a Flower reply that carries an ``Error`` is *failed*, not rejected);
- the round goes on: with at least one honest reply it aggregates, and the server state is
  then *equal* (``torch.equal``, same keys) to that of an identical server that received only
  the honest replies; every floating tensor of the state stays finite.

Each method family gets one tiny-bert federation (module-scoped; building is the slow part)
with 3 of 4 clients sampled per round, so a valid client id is left out of every round.
Honest clients move every float tensor of their start state by 0.01 * seeded noise. Bad
replies are generated deterministically from ``SEED``: per round a table of identity,
num_examples, metric and per-tensor corruptions (``TENSOR_KINDS``, ``ARRAY_KINDS``, the HAFL
index/score kinds, rank changes) aimed at a few (client, key) targets. They are checked two
ways: every case alone in a round of its own (so one crash hides nothing, and each failure
is named ``r<round> <kind>[<target>]``), and all cases of a round in one call, over two
rounds. Every test collects all its outcomes and fails once, with a summary grouped by cause.

bf16/fp16 float tensors (the server widens them) and non-contiguous or Fortran-ordered arrays
are legal; ``test_legal_variants_are_accepted`` checks that they are accepted.
Set ``FEDTUNE_FUZZ_REPORT=<file>`` to append every outcome there as JSON lines.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import traceback
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import METHOD_CASES, tiny_overrides, write_classification_jsonl
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import load_config
from fedtune.runtime.engine import build_federation
from fedtune.runtime.flower import strategy as strategy_module
from fedtune.runtime.flower.strategy import FedtuneStrategy
from fedtune.runtime.server import FederatedServer, Reply

# the odd tensors are built on purpose; torch warns that their kinds are beta/prototype/deprecated
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]

SEED = 20250
ROUNDS = (1, 2)
CLIENTS = 4
PER_ROUND = 3  # of CLIENTS: a valid client id is not sampled in each round
TARGETS_PER_KIND = {1: 2, 2: 1}  # round -> (client, key) targets per per-tensor kind
LIMIT = 1e6  # the server rejects any float entry with |value| > LIMIT by default
NODE = 1000  # client k's Flower node id is NODE + k
UNKNOWN_NODE = 5555
HONEST_METRICS = {"train_loss": 1.0}
#: families whose every Flower case also runs alone (the slowest test); the all-at-once Flower
#: rounds run for every family. FEDTUNE_FUZZ_ALL=1: every family.
FLOWER_SINGLE_FAMILIES = {"fedit", "fedavg-full", "hetlora", "flexlora", "hafl-truncation"}

# every method family with a server state (GaLore aggregates like full-weight FedAvg, and a
# kept A changes nothing the server sees)
FAMILIES = {k: v for k, v in METHOD_CASES.items() if k not in ("fed-alora-keep", "local-only", "fedavg-galore")}

State = dict[str, torch.Tensor]
NA = object()  # a kind that does not apply to this tensor
MISSING = object()  # a kind that deletes the key
HONEST = object()  # keep the honest value


# -- the honest federation ------------------------------------------------------------------
def seed_of(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in (SEED, *parts)).encode())


def fresh(state: State) -> State:
    return {k: v.clone() for k, v in state.items()}


@dataclass
class RoundData:
    """One round's honest side: who was sampled, what each got and what it sends back."""

    round_num: int
    sampled: list[int]
    sent: dict[int, State]
    uploads: dict[int, State]
    serialised: dict[int, dict[str, Array]] = field(default_factory=dict)  # the uploads as Flower Arrays

    @property
    def not_sampled(self) -> list[int]:
        return [k for k in range(CLIENTS) if k not in self.sampled]

    def honest(self, k: int) -> Reply:
        return Reply(k, num_examples(k), fresh(self.uploads[k]), dict(HONEST_METRICS))


def num_examples(k: int) -> int:
    return 10 + k


class World:
    """A family's federation, its honest rounds, and honest-only reference states."""

    def __init__(self, name: str, fed: Any) -> None:
        self.name, self.fed, self.method = name, fed, fed.method
        self.server_rank = fed.config.server_rank
        self.rounds: dict[int, RoundData] = {}
        reference = self.new_server()
        for r in ROUNDS:
            self.rounds[r] = self._honest_round(reference, r)
            reference.receive(r, [self.rounds[r].honest(k) for k in self.rounds[r].sampled], self.rounds[r].sent)
        self._references: dict[tuple[int, frozenset[int]], State] = {}
        self._flower_references: dict[tuple[int, frozenset[int]], State] = {}

    def new_server(self) -> FederatedServer:
        return FederatedServer(self.fed)

    def _honest_round(self, server: FederatedServer, r: int) -> RoundData:
        sampled = list(server.sampled(r))
        sent, uploads = {}, {}
        for k in sampled:
            sent[k], _ = server.payload(k)
            start = server.client_start(k, sent[k])
            g = torch.Generator().manual_seed(seed_of(self.name, "noise", r, k))
            trained = {
                key: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() and not key.startswith("_") else v
                for key, v in start.items()
            }
            uploads[k], _ = self.method.client_finish(trained, start)
        return RoundData(r, sampled, sent, uploads)

    def replay(self, server: FederatedServer, before: int) -> None:
        """Feed ``server`` the honest rounds before round ``before``."""
        for r in ROUNDS:
            if r >= before:
                break
            rd = self.rounds[r]
            server.receive(r, [rd.honest(k) for k in rd.sampled], {k: server.payload(k)[0] for k in rd.sampled})

    def reference(self, r: int, excluded: Iterable[int] = ()) -> State:
        """The state after round r of a server that got every honest reply, less ``excluded``'s in round r."""
        key = (r, frozenset(excluded))
        if key not in self._references:
            server = self.new_server()
            self.replay(server, r)
            rd = self.rounds[r]
            server.receive(r, [rd.honest(k) for k in rd.sampled if k not in key[1]], rd.sent)
            self._references[key] = server.state
        return self._references[key]

    def flower_reference(self, r: int, excluded: Iterable[int] = ()) -> State:
        """The same through a second strategy that got only the honest Flower replies."""
        key = (r, frozenset(excluded))
        if key not in self._flower_references:
            strategy, messages = self.new_strategy(r)
            rd = self.rounds[r]
            replies = [render(honest_spec(rd, k), messages, r) for k in rd.sampled if k not in key[1]]
            strategy.aggregate_train(r, replies)
            self._flower_references[key] = strategy.server.state
        return self._flower_references[key]

    def new_strategy(self, r: int) -> tuple[FedtuneStrategy, dict[int, Message]]:
        """A strategy around a fresh server that went through the honest rounds before r (in-process:
        round 1 has Flower cases of its own), and its round-r messages by node."""
        server = self.new_server()
        self.replay(server, r)
        strategy = FedtuneStrategy(server)
        strategy.node_of = {k: NODE + k for k in range(CLIENTS)}
        return strategy, train_messages(strategy, r)


def train_messages(strategy: FedtuneStrategy, r: int) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in strategy.configure_train(r, ArrayRecord(), ConfigRecord(), None)}


# -- per-tensor corruptions (torch; flower=True: expressible as a numpy Array too) ------------
def _one(t: torch.Tensor, value: float) -> Any:
    if t.numel() == 0 or not t.is_floating_point():
        return NA
    out = t.detach().clone().contiguous()
    out.view(-1)[t.numel() // 2] = value
    return out


def _all(t: torch.Tensor, value: float) -> Any:
    return torch.full_like(t, value) if t.is_floating_point() else NA


def _sparse_csr(t: torch.Tensor) -> Any:
    return t.to_sparse_csr() if t.dim() == 2 else NA


@dataclass(frozen=True)
class Kind:
    name: str
    apply: Callable[[torch.Tensor], Any]
    flower: bool = True


TENSOR_KINDS: list[Kind] = [
    Kind("key.missing", lambda t: MISSING),
    Kind("type.list", lambda t: t.tolist(), flower=False),
    Kind("type.numpy", lambda t: t.numpy().copy(), flower=False),
    Kind("type.none", lambda t: None, flower=False),
    Kind("type.str", lambda t: "0.0", flower=False),
    Kind("type.float", lambda t: 0.5, flower=False),
    Kind("shape.extra_row", lambda t: torch.cat([t, t[:1]]) if t.dim() >= 1 else NA),
    Kind("shape.extra_col", lambda t: torch.cat([t, t[:, :1]], dim=1) if t.dim() == 2 else NA),
    Kind("shape.transposed", lambda t: t.T.contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1] else NA),
    Kind("shape.scalar", lambda t: t.reshape(-1)[0].clone()),
    Kind("shape.flat", lambda t: t.reshape(-1).clone() if t.dim() >= 2 else NA),
    Kind("shape.empty", lambda t: t[:0].clone() if t.dim() >= 1 else NA),
    Kind("shape.extra_dim", lambda t: t.unsqueeze(0).clone()),
    Kind("dtype.float64", lambda t: t.double()),
    Kind("dtype.int64", lambda t: t.long()),
    Kind("dtype.int32", lambda t: t.int()),
    Kind("dtype.bool", lambda t: t != 0),
    Kind("dtype.complex64", lambda t: t.to(torch.complex64)),
    Kind("dtype.uint8", lambda t: t.to(torch.uint8)),
    Kind("dtype.int8", lambda t: t.to(torch.int8)),
    Kind("dtype.float8", lambda t: t.to(torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else NA, flower=False),
    Kind("value.nan_one", lambda t: _one(t, float("nan"))),
    Kind("value.nan_all", lambda t: _all(t, float("nan"))),
    Kind("value.posinf_one", lambda t: _one(t, float("inf"))),
    Kind("value.posinf_all", lambda t: _all(t, float("inf"))),
    Kind("value.neginf_one", lambda t: _one(t, float("-inf"))),
    Kind("value.neginf_all", lambda t: _all(t, float("-inf"))),
    Kind("value.1e30_all", lambda t: _all(t, 1e30)),
    Kind("value.neg1e30_one", lambda t: _one(t, -1e30)),
    Kind("value.f32max_all", lambda t: _all(t, float(torch.finfo(torch.float32).max))),
    Kind("value.1e7_all", lambda t: _all(t, 1e7)),
    Kind("value.over_limit_one", lambda t: _one(t, LIMIT + 1)),
    Kind("value.fp16_inf_one", lambda t: v.half() if (v := _one(t, float("inf"))) is not NA else NA),
    Kind("value.bf16_nan_all", lambda t: v.bfloat16() if (v := _all(t, float("nan"))) is not NA else NA, flower=False),
    Kind("value.bf16_1e30_all", lambda t: v.bfloat16() if (v := _all(t, 1e30)) is not NA else NA, flower=False),
    Kind("layout.sparse_coo", lambda t: t.to_sparse(), flower=False),
    Kind("layout.sparse_csr", _sparse_csr, flower=False),
    Kind("layout.nested", lambda t: torch.nested.nested_tensor([t, t[:1]]) if t.dim() >= 1 else NA, flower=False),
    Kind("dtype.quantized", lambda t: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8) if t.dtype == torch.float32 else NA, flower=False),
    Kind("device.meta", lambda t: t.to("meta"), flower=False),
]


# -- Flower-only corruptions: Arrays a numpy/torch tensor cannot produce ------------------------
def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _raw(t: torch.Tensor, stype: str = "numpy.ndarray", data: bytes | None = None, dtype: str | None = None) -> Array:
    a = t.detach().numpy()
    return Array(dtype=dtype or str(a.dtype), shape=tuple(a.shape), stype=stype, data=_npy(a) if data is None else data)


def _garbage(t: torch.Tensor) -> Array:
    rng = random.Random(seed_of("garbage", tuple(t.shape)))
    return _raw(t, data=rng.randbytes(max(8, len(_npy(t.numpy())))))


def _object_array(t: torch.Tensor) -> Array:
    a = np.empty(t.numel(), dtype=object)
    a[:] = [float(x) for x in t.reshape(-1)]
    return _raw(t, data=_npy(a.reshape(tuple(t.shape)), allow_pickle=True), dtype="object")


ARRAY_KINDS: list[Kind] = [
    Kind("array.big_endian", lambda t: Array(t.numpy().astype(t.numpy().dtype.newbyteorder(">")))),
    Kind("array.unicode", lambda t: Array(np.full(tuple(t.shape), "x"))),
    Kind("array.structured", lambda t: Array(np.zeros(tuple(t.shape), dtype=[("a", "<f4"), ("b", "<i4")]))),
    Kind("array.object_pickle", _object_array),
    Kind("array.unknown_stype", lambda t: _raw(t, stype="torch.raw")),
    Kind("array.garbage_bytes", _garbage),
    Kind("array.truncated_npy", lambda t: _raw(t, data=_npy(t.numpy())[:-5])),
    Kind("array.empty_data", lambda t: _raw(t, data=b"")),
    Kind("array.headerless_bytes", lambda t: _raw(t, data=t.numpy().tobytes())),
]


# -- key helpers --------------------------------------------------------------------------------
A_LIKE = (".lora_A", ".alora_B1")  # rank is dim 0
B_LIKE = (".lora_B", ".alora_B2")  # rank is dim 1
INDEX, SCORE = ".hafl_index", ".hafl_score"


def perturbed(upload: State) -> State:
    """A plausible upload that differs from the honest one (for a second reply of one client)."""
    return {key: v + 0.02 if v.is_floating_point() and not key.endswith(SCORE) else v.clone() for key, v in upload.items()}


def float_keys(upload: State) -> list[str]:
    return sorted(k for k, v in upload.items() if v.is_floating_point())


def change_rank(upload: State, delta: int, modules: str) -> Any:
    """Every A-like factor gets ``delta`` rows, every B-like factor ``delta`` columns (one module or all)."""
    keys = sorted(k for k in upload if k.endswith(A_LIKE + B_LIKE))
    if not keys:
        return NA
    if modules == "one":
        stem = keys[0].rsplit(".", 1)[0]
        keys = [k for k in keys if k.rsplit(".", 1)[0] == stem]
    out = dict(upload)
    for key in keys:
        t, dim = upload[key], 0 if key.endswith(A_LIKE) else 1
        if t.shape[dim] + delta < 1:
            return NA
        if delta > 0:
            extra = 0.01 * torch.ones_like(t.narrow(dim, 0, 1)).repeat_interleave(delta, dim=dim)
            out[key] = torch.cat([t, extra], dim=dim)
        else:
            out[key] = t.narrow(dim, 0, t.shape[dim] + delta).clone()
    return out


# -- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad (or failed) reply. ``slot``: the sampled client whose honest reply it replaces in a
    round of its own (None: it comes in addition to all honest replies)."""

    round_num: int
    kind: str
    target: str
    slot: int | None
    build: Callable[[], Any]  # a fresh Reply (in-process) or FlowerSpec (Flower)
    failed: bool = False  # a Flower Error reply: failed, not rejected

    @property
    def label(self) -> str:
        return f"r{self.round_num} {self.kind}[{self.target}]"


class CaseMaker:
    """Collects a round's cases; targets cycle over a shuffled pool of sampled clients."""

    def __init__(self, world: World, r: int, mode: str, pool: list[int] | None = None) -> None:
        self.world, self.rd, self.r = world, world.rounds[r], r
        self.rng = random.Random(seed_of(world.name, mode, r))
        self.pool = list(pool if pool is not None else self.rd.sampled)
        self.rng.shuffle(self.pool)
        self.cases: list[Case] = []
        self._turn = 0

    def next_client(self) -> int:
        self._turn += 1
        return self.pool[self._turn % len(self.pool)]

    def add(self, kind: str, target: str, slot: int | None, build: Callable[[], Any], failed: bool = False) -> None:
        self.cases.append(Case(self.r, kind, target, slot, build, failed))

    def tensor_cases(
        self, kinds: list[Kind], wrap: Callable[[int, Callable[[State], Any]], Callable[[], Any]], targets: int | None = None
    ) -> None:
        """Each kind on ``targets`` (client, float key) targets (default: the round's
        TARGETS_PER_KIND); ``wrap`` turns an upload mutation into a reply builder."""
        targets = targets or TARGETS_PER_KIND[self.r]
        for kind in kinds:
            found = 0
            for _ in range(4 * targets):
                if found == targets:
                    break
                k = self.next_client()
                key = self.rng.choice(float_keys(self.rd.uploads[k]))
                if kind.apply(self.rd.uploads[k][key]) is NA:
                    continue
                found += 1
                self.add(kind.name, f"c{k}:{key}", k, wrap(k, _set_key(key, kind.apply)))

    def structure_cases(self, wrap: Callable[[int, Callable[[State], Any]], Callable[[], Any]]) -> None:
        """Extra keys, rank changes, HAFL index/score/budget corruptions."""
        k = self.next_client()
        first = sorted(self.rd.uploads[k])[0]
        for name in ("bert.nonexistent.lora_A", "_injected.bookkeeping", first + "x"):
            self.add("key.extra", f"c{k}:{name}", k, wrap(k, _add_key(name, first)))
        by_rank = sorted(self.pool, key=lambda c: self.rd.uploads[c][first].shape)
        for kind, delta, modules, k in (
            ("rank.up_one_module", 1, "one", by_rank[0]),
            ("rank.up_all", 4, "all", by_rank[0]),
            ("rank.up_all", 2, "all", by_rank[-1]),
            ("rank.down_all", -1, "all", by_rank[-1]),
        ):
            if change_rank(self.rd.uploads[k], delta, modules) is not NA:
                self.add(kind, f"c{k}:{delta:+d}", k, wrap(k, lambda up, d=delta, m=modules: change_rank(up, d, m)))
        if any(key.endswith(INDEX) for key in self.rd.uploads[k]):
            self.hafl_cases(wrap)

    def hafl_cases(self, wrap: Callable[[int, Callable[[State], Any]], Callable[[], Any]]) -> None:
        r, truncation = self.world.server_rank, self.world.method.truncation
        for kind, fn in HAFL_INDEX_KINDS.items():
            if kind == "index.unsent" and not truncation:
                continue
            for _ in range(TARGETS_PER_KIND[self.r]):
                k = self.next_client()
                module = self.rng.choice(sorted(key[: -len(INDEX)] for key in self.rd.uploads[k] if key.endswith(INDEX)))
                sent_index = self.rd.sent[k].get(module + INDEX)
                if fn(self.rd.uploads[k], module, r, sent_index) is NA:
                    continue
                self.add(kind, f"c{k}:{module}{INDEX}", k, wrap(k, lambda up, f=fn, m=module, s=sent_index: f(up, m, r, s)))
        if truncation:
            for kind in SCORE_KINDS:
                k = self.next_client()
                key = self.rng.choice(sorted(key for key in self.rd.uploads[k] if key.endswith(SCORE)))
                self.add(kind.name, f"c{k}:{key}", k, wrap(k, _set_key(key, kind.apply)))


def _set_key(key: str, apply: Callable[[torch.Tensor], Any]) -> Callable[[State], State]:
    def mutate(upload: State) -> State:
        value = apply(upload[key])
        out = dict(upload)
        if value is MISSING:
            del out[key]
        else:
            out[key] = value
        return out

    return mutate


def _add_key(name: str, like: str) -> Callable[[State], State]:
    return lambda upload: {**upload, name: upload[like].clone()}


# HAFL index corruptions: (upload, module, server rank r, indices the server sent or None) -> upload
def _index_edit(edit: Callable[[torch.Tensor, int, torch.Tensor | None], Any]) -> Callable[..., Any]:
    def mutate(upload: State, module: str, r: int, sent: torch.Tensor | None) -> Any:
        value = edit(upload[module + INDEX], r, sent)
        return NA if value is NA else {**upload, module + INDEX: value}

    return mutate


def _unused(index: torch.Tensor, r: int, avoid: torch.Tensor | None = None) -> int | None:
    taken = set(index.tolist()) | (set(avoid.tolist()) if avoid is not None else set())
    free = [i for i in range(r) if i not in taken]
    return free[0] if free else None


def _replace_one(index: torch.Tensor, value: int) -> torch.Tensor:
    out = index.clone()
    out[-1] = value
    return out


def _budget_exceeded(upload: State, module: str, r: int, sent: torch.Tensor | None) -> Any:
    """One more component than the client's budget, consistently: A row, B column, index (and score)."""
    index = upload[module + INDEX]
    extra = _unused(index, r)
    if extra is None:
        return NA
    out = dict(upload)
    a, b = upload[module + ".lora_A"], upload[module + ".lora_B"]
    out[module + ".lora_A"] = torch.cat([a, a[:1]])
    out[module + ".lora_B"] = torch.cat([b, b[:, :1]], dim=1)
    out[module + INDEX] = torch.cat([index, torch.tensor([extra], dtype=index.dtype)])
    if module + SCORE in upload:
        out[module + SCORE] = torch.cat([upload[module + SCORE], upload[module + SCORE][:1]])
    return out


HAFL_INDEX_KINDS: dict[str, Callable[..., Any]] = {
    "index.fewer": _index_edit(lambda i, r, s: i[:-1].clone()),
    "index.more": _index_edit(lambda i, r, s: NA if (u := _unused(i, r)) is None else torch.cat([i, torch.tensor([u], dtype=i.dtype)])),
    "index.eq_rank": _index_edit(lambda i, r, s: _replace_one(i, r)),
    "index.beyond_rank": _index_edit(lambda i, r, s: _replace_one(i, r + 3)),
    "index.negative": _index_edit(lambda i, r, s: _replace_one(i, -1)),
    "index.int32_min": _index_edit(lambda i, r, s: _replace_one(i, -(2**31))),
    "index.repeated": _index_edit(lambda i, r, s: _replace_one(i, int(i[0])) if i.numel() >= 2 else NA),
    "index.float": _index_edit(lambda i, r, s: i.float()),
    "index.bool": _index_edit(lambda i, r, s: i != 0),
    "index.2d": _index_edit(lambda i, r, s: i.reshape(1, -1).clone()),
    "index.empty": _index_edit(lambda i, r, s: i[:0].clone()),
    "index.unsent": _index_edit(lambda i, r, s: NA if (u := _unused(i, r, s)) is None else _replace_one(i, u)),
    "index.budget_exceeded": _budget_exceeded,
}

SCORE_KINDS: list[Kind] = [
    Kind("score.nan", lambda t: _one(t, float("nan"))),
    Kind("score.inf", lambda t: _one(t, float("inf"))),
    Kind("score.negative", lambda t: _one(t, -1.0)),
    Kind("score.longer", lambda t: torch.cat([t, t[:1]])),
    Kind("score.shorter", lambda t: t[:-1].clone()),
    Kind("score.2d", lambda t: t.reshape(1, -1).clone()),
    Kind("score.int", lambda t: t.int()),
    Kind("score.1e30", lambda t: _all(t, 1e30)),
]


# -- in-process cases -----------------------------------------------------------------------------
NUM_EXAMPLES_BAD: list[Any] = [
    0, -1, -(10**9), 10**7 + 1, 10**12, 2**63 - 1, 2**64,
    2.5, float("nan"), float("inf"), float("-inf"), True, False, "10", None, [10],
]  # fmt: skip
TRAIN_LOSS_BAD: list[Any] = [float("nan"), float("inf"), float("-inf"), [1.0], "1.0", None, True]


def inprocess_cases(world: World, r: int) -> list[Case]:
    rd = world.rounds[r]
    cm = CaseMaker(world, r, "inproc")

    def wrap(k: int, mutate: Callable[[State], Any]) -> Callable[[], Reply]:
        return lambda: Reply(k, num_examples(k), mutate(fresh(rd.uploads[k])), dict(HONEST_METRICS))

    def reply(k: Any, tensors_of: int, n: Any = HONEST, metrics: Any = HONEST, perturb: bool = False) -> Callable[[], Reply]:
        def build() -> Reply:
            tensors = perturbed(rd.uploads[tensors_of]) if perturb else fresh(rd.uploads[tensors_of])
            return Reply(k, num_examples(tensors_of) if n is HONEST else n, tensors, dict(HONEST_METRICS) if metrics is HONEST else metrics)

        return build

    # identity: extra replies next to every honest one
    any_k = cm.next_client()
    for cid in (99, -1, CLIENTS, 2**63 - 1, "0", 1.5, None, True):
        cm.add("id.unknown", repr(cid), None, reply(cid, any_k))
    for n in rd.not_sampled:
        cm.add("id.not_sampled", str(n), None, reply(n, any_k))
    for k in rd.sampled:
        cm.add("id.duplicate_changed", str(k), None, reply(k, k, perturb=True))
    cm.add("id.duplicate_identical", str(any_k), None, reply(any_k, any_k))
    # num_examples and metrics: the slot's own upload
    for n in NUM_EXAMPLES_BAD:
        k = cm.next_client()
        cm.add("num_examples", f"c{k}:{n!r}", k, reply(k, k, n=n))
    for loss in TRAIN_LOSS_BAD:
        k = cm.next_client()
        cm.add("metrics.train_loss", f"c{k}:{loss!r}", k, reply(k, k, metrics={"train_loss": loss}))
    for metrics in (None, "loss=1"):
        k = cm.next_client()
        cm.add("metrics.not_a_dict", f"c{k}:{metrics!r}", k, reply(k, k, metrics=metrics))
    k = cm.next_client()
    cm.add("metrics.extra_nan", f"c{k}:compute_seconds", k, reply(k, k, metrics={"train_loss": 1.0, "compute_seconds": float("nan")}))
    # the tensors container itself
    for name, make in (
        ("none", lambda up: None),
        ("list", lambda up: list(up.values())),
        ("empty", lambda up: {}),
        ("items_tuple", lambda up: tuple(up.items())),
        ("int_key", lambda up: {**up, 0: next(iter(up.values())).clone()}),
    ):
        k = cm.next_client()
        cm.add("tensors." + name, f"c{k}", k, wrap(k, make))
    cm.tensor_cases(TENSOR_KINDS, wrap)
    cm.structure_cases(wrap)
    return cm.cases


# -- Flower cases ---------------------------------------------------------------------------------
@dataclass
class FlowerSpec:
    """A reply message before it is built: from which node, which records with what in them."""

    node: int
    arrays: dict[str, Any]  # tensors or flwr Arrays (or anything to be put in as is)
    metrics: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)  # record name -> a record to use, or None to drop
    error: bool = False


def honest_spec(rd: RoundData, k: int) -> FlowerSpec:
    """Client k's honest reply; its arrays are serialised once per round (new Array objects
    sharing the immutable bytes each time)."""
    if k not in rd.serialised:
        rd.serialised[k] = {key: _flower_value(v) for key, v in rd.uploads[k].items()}
    arrays = {key: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data) for key, a in rd.serialised[k].items()}
    metrics = {"client-id": k, "num-examples": num_examples(k), "train_loss": 1.0, "compute_seconds": 0.5, "train_state_bytes": 1000}
    return FlowerSpec(NODE + k, arrays, metrics)


def render(spec: FlowerSpec, messages: dict[int, Message], r: int) -> Message:
    """The reply a ClientApp on ``spec.node`` would send (a node never messaged gets a synthetic request)."""
    request = messages.get(spec.node) or Message(RecordDict(), dst_node_id=spec.node, message_type=MessageType.TRAIN, group_id=str(r))
    if spec.error:
        return Message(Error(code=7, reason="fuzz: client crashed"), reply_to=request)
    arrays = ArrayRecord()
    for key, value in spec.arrays.items():
        arrays[key] = value if isinstance(value, Array) else Array(np.ascontiguousarray(value.detach().numpy()))
    records: dict[str, Any] = {"arrays": arrays, "metrics": MetricRecord(spec.metrics)}
    records.update(spec.records)
    reply = Message(RecordDict({k: v for k, v in records.items() if v is not None}), reply_to=request)
    assert reply.metadata.src_node_id == spec.node
    return reply


def _flower_value(value: Any) -> Any:
    return value if isinstance(value, Array) else Array(np.ascontiguousarray(value.detach().numpy()))


FLOWER_NUM_EXAMPLES_BAD: list[Any] = [0, -1, 10**7 + 1, 10**12, 2**63 - 1, 2.5, float("nan"), float("inf"), float("-inf"), [10]]
METRIC_FIELDS = ("client-id", "num-examples", "train_loss", "compute_seconds")
OPTIONAL_METRIC_FIELDS = ("train_state_bytes", "model-loads")  # a ClientApp sends them; missing is fine


def flower_error_client(rd: RoundData) -> int | None:
    """The client whose node reports an Error in the all-at-once Flower round (the last round only)."""
    return rd.sampled[-1] if rd.round_num == ROUNDS[-1] else None


def flower_cases(world: World, r: int) -> list[Case]:
    rd = world.rounds[r]
    errored = flower_error_client(rd)
    cm = CaseMaker(world, r, "flower", pool=[k for k in rd.sampled if k != errored])

    def spec(k: int, node: int | None = None, claims: Any = None, perturb: bool = False, **changes: Any) -> Callable[[], FlowerSpec]:
        def build() -> FlowerSpec:
            s = honest_spec(rd, k)
            if node is not None:
                s.node = node
            if claims is not None:
                s.metrics["client-id"] = claims
            if perturb:
                s.arrays = perturbed(rd.uploads[k])
            return replace(s, **changes)

        return build

    def with_metric(k: int, name: str, value: Any) -> Callable[[], FlowerSpec]:
        def build() -> FlowerSpec:
            s = honest_spec(rd, k)
            if value is MISSING:
                del s.metrics[name]
            else:
                s.metrics[name] = value
            return s

        return build

    def wrap(k: int, mutate: Callable[[State], Any]) -> Callable[[], FlowerSpec]:
        def build() -> FlowerSpec:
            s = honest_spec(rd, k)
            s.arrays = {key: _flower_value(v) for key, v in mutate(fresh(rd.uploads[k])).items()}
            return s

        return build

    any_k = cm.next_client()
    other = next(j for j in rd.sampled if j != any_k)
    # identity: who claims to be whom, from which node
    cm.add("id.unknown", "99@node1099", None, spec(any_k, node=NODE + 99, claims=99))
    cm.add("id.unknown", f"99@node{NODE + other}", None, spec(any_k, node=NODE + other, claims=99))
    cm.add("id.unknown", f"-1@node{NODE + other}", None, spec(any_k, node=NODE + other, claims=-1))
    cm.add("id.unknown", f"{CLIENTS}@node{NODE + CLIENTS}", None, spec(any_k, node=NODE + CLIENTS, claims=CLIENTS))
    for n in rd.not_sampled:
        cm.add("id.not_sampled", f"{n}@own-node", None, spec(any_k, node=NODE + n, claims=n))
    for k in cm.pool:
        j = next(c for c in rd.sampled if c != k)
        cm.add("id.impersonate_sampled", f"{k}@node{NODE + j}", k, spec(k, node=NODE + j))
    k = cm.next_client()
    cm.add("id.impersonate_unknown_node", f"{k}@node{UNKNOWN_NODE}", k, spec(k, node=UNKNOWN_NODE))
    for n in rd.not_sampled:
        k = cm.next_client()
        cm.add("id.impersonate_unsampled_node", f"{k}@node{NODE + n}", k, spec(k, node=NODE + n))
    for k in cm.pool:
        cm.add("id.duplicate_changed", str(k), None, spec(k, perturb=True))
    cm.add("id.duplicate_identical", str(any_k), None, spec(any_k))
    # metrics
    for name in METRIC_FIELDS:
        for label, value in (("missing", MISSING), ("nan", float("nan")), ("inf", float("inf")), ("list", [1.0, 2.0])):
            k = cm.next_client()
            cm.add(f"metrics.{label}", f"c{k}:{name}", k, with_metric(k, name, value))
    for name in OPTIONAL_METRIC_FIELDS:
        for label, value in (("nan", float("nan")), ("inf", float("inf")), ("list", [1, 2])):
            k = cm.next_client()
            cm.add(f"metrics.{label}", f"c{k}:{name}", k, with_metric(k, name, value))
    for n in FLOWER_NUM_EXAMPLES_BAD:
        k = cm.next_client()
        cm.add("num_examples", f"c{k}:{n!r}", k, with_metric(k, "num-examples", n))
    k = cm.next_client()
    cm.add("metrics.client_id_float", f"c{k}:{k}.5", k, with_metric(k, "client-id", k + 0.5))
    for name, value in (("num-examples", "10"), ("client-id", "0"), ("num-examples", True), ("train_loss", b"1.0")):
        k = cm.next_client()
        metrics = {**honest_spec(rd, k).metrics, name: value}
        cm.add("metrics.config_record", f"c{k}:{name}={value!r}", k, spec(k, records={"metrics": ConfigRecord(metrics)}))
    # records
    for label, records in (
        ("no_metrics", {"metrics": None}),
        ("no_arrays", {"arrays": None}),
        ("empty", {"metrics": None, "arrays": None}),
        ("arrays_is_metricrecord", {"arrays": MetricRecord({"x": 1.0})}),
        ("metrics_is_arrayrecord", {"metrics": ArrayRecord()}),
        ("arrays_is_configrecord", {"arrays": ConfigRecord({"x": "y"})}),
    ):
        k = cm.next_client()
        cm.add("records." + label, f"c{k}", k, spec(k, records=records))
    # tensors
    # one target each for what the in-process tests already aim at two; more for the Flower-only kinds
    cm.tensor_cases([kind for kind in TENSOR_KINDS if kind.flower], wrap, targets=1)
    cm.tensor_cases(ARRAY_KINDS, wrap, targets=3)
    cm.structure_cases(wrap)
    # failed (Error) replies: counted as failed, not rejected
    for k in cm.pool[:2]:
        cm.add("error.reply", f"c{k}", k, spec(k, error=True), failed=True)
    return cm.cases


# -- judging ---------------------------------------------------------------------------------------
def where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/fedtune/" in f.filename and "/tests/" not in f.filename] or frames
    frame = ours[-1]
    path = frame.filename.split("/src/")[-1] if "/src/" in frame.filename else Path(frame.filename).name
    return f"{path}:{frame.lineno} in {frame.name}"


def compare(state: State, reference: State) -> list[str]:
    problems = []
    if set(state) != set(reference):
        problems.append("state keys differ from the honest-only reference")
    elif not all(torch.equal(state[k], reference[k]) for k in reference):
        problems.append("state differs from the honest-only reference")
    if not all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()):
        problems.append("non-finite state")
    return problems


def judge(metrics: dict, state: State, reference: State, bad: int, failed: int | None = None) -> tuple[str, str] | None:
    """(cause, detail) of what broke the contract, or None."""
    problems, details = [], []
    got = metrics.get("rejected_replies")
    if got != bad:
        problems.append("accepted though bad" if isinstance(got, int) and got < bad else "rejected_replies over-counted")
        details.append(f"rejected_replies={got!r}, expected {bad}")
    if failed is not None and metrics.get("failed_replies") != failed:
        problems.append("failed_replies wrong")
        details.append(f"failed_replies={metrics.get('failed_replies')!r}, expected {failed}")
    if metrics.get("aggregated") is not True:
        problems.append("round not aggregated")
    problems += compare(state, reference)
    if not problems:
        return None
    return "; ".join(problems), ", ".join(details)


def crash(error: BaseException) -> tuple[str, str]:
    return f"raises {type(error).__name__} at {where(error)}", str(error).splitlines()[0][:120] if str(error) else ""


class Outcomes:
    """All outcomes of one test; fails once, grouped by cause."""

    def __init__(self, test: str, family: str) -> None:
        self.test, self.family = test, family
        self.total = 0
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.records: list[dict] = []

    def record(self, label: str, result: tuple[str, str] | None) -> None:
        self.total += 1
        cause, detail = result if result else ("ok", "")
        self.records.append({"test": self.test, "family": self.family, "case": label, "cause": cause, "detail": detail})
        if result:
            self.failures[cause].append(f"{label} ({detail})" if detail else label)

    def check(self) -> None:
        path = os.environ.get("FEDTUNE_FUZZ_REPORT")
        if path:
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        if self.failures:
            failed = sum(len(v) for v in self.failures.values())
            lines = [f"{self.family}: {failed} of {self.total} cases broke the contract"]
            for cause, labels in sorted(self.failures.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {cause} ({len(labels)}):")
                lines += [f"    {label}" for label in labels]
            pytest.fail("\n".join(lines), pytrace=False)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quiet() -> Iterable[None]:
    """Fewer logs (thousands of "dropped reply" warnings otherwise), the identity a ServerApp
    process has (flwr needs it to create messages), and configure_train's per-client settings
    record memoised (the same record; rendering the config as YAML every time is most of the
    Flower tests' time otherwise); all restored afterwards."""
    logger = logging.getLogger("fedtune")
    level = logger.level
    logger.setLevel(logging.ERROR)
    saved = {name: TaskIdentity.__dict__[name] for name in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, SUPERLINK_NODE_ID
    original, memo = getattr(strategy_module, "settings_record", None), {}

    def settings_record(config: Any, *args: Any, **kwargs: Any) -> Any:
        key = (id(config), repr(args), repr(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = original(config, *args, **kwargs)
        return memo[key]

    with pytest.MonkeyPatch.context() as patch:
        if original is not None:
            patch.setattr(strategy_module, "settings_record", settings_record)
        yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)
    logger.setLevel(level)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, quiet: None) -> World:
    dataset = write_classification_jsonl(tmp_path_factory.mktemp("fuzz") / "cls.jsonl")
    overrides = tiny_overrides(dataset, clients=CLIENTS, clients_per_round=PER_ROUND, **FAMILIES[request.param])
    return World(request.param, build_federation(load_config(None, overrides)))


# -- tests -----------------------------------------------------------------------------------------
def test_honest_rounds_are_clean(world: World) -> None:
    """The baseline every other test compares with: honest replies are all accepted."""
    server = world.new_server()
    for r in ROUNDS:
        rd = world.rounds[r]
        metrics = server.receive(r, [rd.honest(k) for k in rd.sampled], rd.sent)
        assert metrics["rejected_replies"] == 0 and metrics["aggregated"], metrics
    assert compare(server.state, world.reference(ROUNDS[-1])) == []
    assert sum(len(inprocess_cases(world, r)) for r in ROUNDS) >= 200
    assert sum(len(flower_cases(world, r)) - 2 for r in ROUNDS) >= 200  # less the Error replies


def position(case: Case, honest: int) -> int:
    """Where a case goes among the honest replies: after them if it is a second reply (the first
    one for a client is the one kept), anywhere (seeded) if it takes a client's place."""
    return honest if case.slot is None else random.Random(seed_of(case.label)).randint(0, honest)


def test_each_bad_reply_alone_in_process(world: World) -> None:
    outcomes = Outcomes("in-process single", world.name)
    for r in ROUNDS:
        rd = world.rounds[r]
        for case in inprocess_cases(world, r):
            server = world.new_server()
            world.replay(server, r)
            replies = [rd.honest(k) for k in rd.sampled if k != case.slot]
            replies.insert(position(case, len(replies)), case.build())
            sent = {k: server.payload(k)[0] for k in rd.sampled}
            try:
                metrics = server.receive(r, replies, sent)
            except Exception as error:
                outcomes.record(case.label, crash(error))
                continue
            excluded = [case.slot] if case.slot is not None else []
            outcomes.record(case.label, judge(metrics, server.state, world.reference(r, excluded), bad=1))
    outcomes.check()


def test_all_bad_replies_at_once_in_process(world: World) -> None:
    """Each round: every honest reply first, then all the round's bad replies, in one receive call."""
    outcomes = Outcomes("in-process batch", world.name)
    server, reference = world.new_server(), world.new_server()
    for r in ROUNDS:
        rd = world.rounds[r]
        cases = inprocess_cases(world, r)
        random.Random(seed_of(world.name, "batch", r)).shuffle(cases)
        replies = [rd.honest(k) for k in rd.sampled] + [c.build() for c in cases]
        reference.receive(r, [rd.honest(k) for k in rd.sampled], {k: reference.payload(k)[0] for k in rd.sampled})
        label = f"r{r} all {len(cases)} bad replies at once"
        try:
            metrics = server.receive(r, replies, {k: server.payload(k)[0] for k in rd.sampled})
            outcomes.record(label, judge(metrics, server.state, reference.state, bad=len(cases)))
        except Exception as error:
            outcomes.record(label, crash(error))
        if compare(server.state, reference.state):  # start the next round in step again
            server = world.new_server()
            world.replay(server, r + 1)
    outcomes.check()


def test_each_bad_reply_alone_through_flower(world: World) -> None:
    if world.name not in FLOWER_SINGLE_FAMILIES and not os.environ.get("FEDTUNE_FUZZ_ALL"):
        pytest.skip("Flower cases one by one: a representative subset of families (FEDTUNE_FUZZ_ALL=1: all)")
    outcomes = Outcomes("flower single", world.name)
    for r in ROUNDS:
        rd = world.rounds[r]
        for case in flower_cases(world, r):
            strategy, messages = world.new_strategy(r)
            replies = [render(honest_spec(rd, k), messages, r) for k in rd.sampled if k != case.slot]
            try:
                replies.insert(position(case, len(replies)), render(case.build(), messages, r))
            except Exception as error:  # the fuzz test's own construction: a bug here, not in the server
                raise AssertionError(f"cannot build Flower case {case.label}") from error
            try:
                strategy.aggregate_train(r, replies)
            except Exception as error:
                outcomes.record(case.label, crash(error))
                continue
            excluded = [case.slot] if case.slot is not None else []
            result = judge(
                strategy.last_row, strategy.server.state, world.flower_reference(r, excluded),
                bad=0 if case.failed else 1, failed=1 if case.failed else 0,
            )  # fmt: skip
            outcomes.record(case.label, result)
    outcomes.check()


def test_all_bad_replies_at_once_through_flower(world: World) -> None:
    """Each round: the honest replies (one node of the last round reports an Error instead), then
    all the round's bad replies, in one aggregate_train call; compared with a second strategy."""
    outcomes = Outcomes("flower batch", world.name)
    strategy, messages = world.new_strategy(ROUNDS[0])
    reference, ref_messages = world.new_strategy(ROUNDS[0])
    for r in ROUNDS:
        rd = world.rounds[r]
        if r != ROUNDS[0]:
            messages, ref_messages = train_messages(strategy, r), train_messages(reference, r)
        errored = flower_error_client(rd)
        honest = [k for k in rd.sampled if k != errored]
        cases = [c for c in flower_cases(world, r) if not c.failed]
        random.Random(seed_of(world.name, "flower-batch", r)).shuffle(cases)
        replies = [render(honest_spec(rd, k), messages, r) for k in honest]
        if errored is not None:
            replies.append(render(replace(honest_spec(rd, errored), error=True), messages, r))
        replies += [render(c.build(), messages, r) for c in cases]
        reference.aggregate_train(r, [render(honest_spec(rd, k), ref_messages, r) for k in honest])
        label = f"r{r} all {len(cases)} bad replies at once" + (f" (+ an Error from client {errored})" if errored is not None else "")
        try:
            strategy.aggregate_train(r, replies)
            failed = int(errored is not None)
            outcomes.record(label, judge(strategy.last_row, strategy.server.state, reference.server.state, bad=len(cases), failed=failed))
        except Exception as error:
            outcomes.record(label, crash(error))
        if compare(strategy.server.state, reference.server.state) and r != ROUNDS[-1]:
            strategy = world.new_strategy(r + 1)[0]  # start the next round in step again
    outcomes.check()


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values and shape in memory laid out differently (a strided view)."""
    if t.dim() == 2:
        return t.T.contiguous().T
    return t.repeat_interleave(2)[::2] if t.dim() == 1 else t


LEGAL_VARIANTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bfloat16": lambda t: t.bfloat16(),
    "float16": lambda t: t.half(),
    "non_contiguous": _non_contiguous,
}


def test_legal_variants_are_accepted(world: World) -> None:
    """Not bad: bf16/fp16 float tensors (the server widens them), non-contiguous tensors, and
    through Flower fp16 and Fortran-ordered arrays. The state equals that of a server that got
    the same values as contiguous float32."""
    r, rd = ROUNDS[0], world.rounds[ROUNDS[0]]
    outcomes = Outcomes("legal variants", world.name)

    def replies_with(k: int, tensors: State) -> list[Reply]:
        return [rd.honest(j) if j != k else Reply(k, num_examples(k), fresh(tensors), dict(HONEST_METRICS)) for j in rd.sampled]

    for number, (name, variant) in enumerate(LEGAL_VARIANTS.items()):
        k = rd.sampled[number % len(rd.sampled)]
        changed = {key: variant(v) if v.is_floating_point() else v for key, v in rd.uploads[k].items()}
        as_float32 = {key: v.float().contiguous() if v.is_floating_point() else v for key, v in changed.items()}
        reference = world.new_server()
        reference.receive(r, replies_with(k, as_float32), rd.sent)
        server = world.new_server()
        label = f"r{r} legal.{name}[c{k}] in-process"
        try:
            outcomes.record(label, judge(server.receive(r, replies_with(k, changed), rd.sent), server.state, reference.state, bad=0))
        except Exception as error:
            outcomes.record(label, crash(error))
        if name == "bfloat16":  # numpy (and so Flower) has no bfloat16
            continue
        # Flower: the fp16 tensors, or the non-contiguous ones as Fortran-ordered npy arrays
        arrays = {key: Array(np.asfortranarray(v.numpy())) for key, v in changed.items()} if name == "non_contiguous" else changed
        strategy, messages = world.new_strategy(r)
        replies = [render(replace(honest_spec(rd, j), arrays=arrays) if j == k else honest_spec(rd, j), messages, r) for j in rd.sampled]
        label = f"r{r} legal.{'fortran_order' if name == 'non_contiguous' else name}[c{k}] flower"
        try:
            strategy.aggregate_train(r, replies)
            outcomes.record(label, judge(strategy.last_row, strategy.server.state, reference.state, bad=0, failed=0))
        except Exception as error:
            outcomes.record(label, crash(error))
    outcomes.check()
