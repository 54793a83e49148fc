"""A Flower strategy that wraps any fedtune method through ``FederatedServer``.

Flower's message API: ``configure_train`` builds one message per sampled client (each
client gets its own payload: a rank-4 HetLoRA client its 4 components, a HAFL client its
top components) and ``aggregate_train`` turns the replies back into tensor dictionaries,
drops failed and invalid ones, and lets the method aggregate. ``run`` owns the round loop
(Flower's ``start`` works too); it adds resuming from a checkpoint, server-side evaluation
of the global model and the run directory's files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedtune.runtime.flower.client_app import settings_record
from fedtune.runtime.flower.records import RecordError, from_record, to_record
from fedtune.runtime.server import FederatedServer, Reply, round_row
from fedtune.state import State

log = logging.getLogger("fedtune.flower.server")


def reply_from_message(message: Message, node_of: dict[int, int]) -> Reply | str:
    """A training reply as a :class:`Reply`, or why it cannot be one (one line).

    The client id a reply claims must be the one its sending node serves: Flower sets
    ``src_node_id`` from the authenticated connection, so a node cannot answer for another
    client (impersonation), whatever its metrics say. Nothing in the message can raise here.
    """
    node = message.metadata.src_node_id
    try:
        content = message.content
        metrics, arrays = content.get("metrics"), content.get("arrays")
    except Exception as err:
        return f"unreadable content ({type(err).__name__})"
    if not isinstance(metrics, MetricRecord) or not isinstance(arrays, ArrayRecord):
        return "the reply lacks its metrics or arrays record"
    values: dict[str, int | float] = {}
    for name, kind in REPLY_METRICS.items():
        value = metrics.get(name)
        if value is None and name in OPTIONAL_METRICS:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
            return f"metric {name} is missing or not a finite {kind.__name__ if isinstance(kind, type) else 'number'}"
        values[name] = value
    client_id = int(values["client-id"])
    if node_of.get(client_id) != node:
        return f"node {node} replied as client {client_id}, which is served by node {node_of.get(client_id)}"
    try:
        tensors = from_record(arrays)
    except RecordError as err:
        return str(err)
    return Reply(
        client_id,
        int(values["num-examples"]),
        tensors,
        {
            "train_loss": float(values["train_loss"]),
            "compute_seconds": float(values["compute_seconds"]),
            "train_state_bytes": int(values.get("train_state_bytes", 0)),
            "model_loads": int(values.get("model-loads", 0)),
        },
        source=f"node {node}",
    )


#: what a ClientApp's training reply reports, and its type
REPLY_METRICS: dict[str, type | tuple[type, ...]] = {
    "client-id": int,
    "num-examples": int,
    "train_loss": (int, float),
    "compute_seconds": (int, float),
    "train_state_bytes": int,
    "model-loads": int,
}
OPTIONAL_METRICS = {"train_state_bytes", "model-loads"}


class FedtuneStrategy(Strategy):
    def __init__(
        self,
        server: FederatedServer,
        global_eval: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.server = server
        self.config = server.config
        self.method = server.method
        self.global_eval = global_eval
        self.node_of: dict[int, int] = {}
        self._sent: dict[int, State] = {}
        self._bytes_down: dict[int, int] = {}

    def summary(self) -> None:
        log.info("fedtune strategy: method %s, %d clients, %d per round", self.method.name, self.config.clients, self.config.sampled_per_round)

    # -- which node is which client -----------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Wait for the clients' nodes, ask each for its partition id and check the answers.

        An answer is the node's claim: nothing in Flower ties a node key to a partition. With
        ``flower.node_partitions`` only the listed nodes are asked and each must claim its
        listed partition; without it every online node is asked and two claims of one
        partition stop the run (neither can be told to be the real holder). In simulation the
        engine itself sets each node's partition id, so there is no claim to doubt.
        """
        start = time.perf_counter()
        clients = self.config.clients
        expected = check_node_partitions(self.config.flower.node_partitions, clients)
        # without a mapping: every online node once `clients` are (sample_nodes' second list)
        nodes = wait_for_nodes(grid, set(expected)) if expected else sample_nodes(grid, clients, 0)[1]
        log.info("%d nodes online after %.1f s", len(nodes), time.perf_counter() - start)
        queries = [
            Message(RecordDict({"config": ConfigRecord({"fedtune": "partition-id"})}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        node_of: dict[int, int] = {}
        for reply in grid.send_and_receive(queries, timeout=self.config.flower.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise PartitionClaimError(f"node {node} did not report its partition: {reply.error.reason}")
            claimed = claimed_partition(reply)
            if isinstance(claimed, str):
                raise PartitionClaimError(f"node {node}: {claimed}")
            if expected and claimed != expected.get(node):
                raise PartitionClaimError(
                    f"node {node} claims partition {claimed}, but flower.node_partitions assigns it partition {expected.get(node)}"
                )
            if not 0 <= claimed < clients:
                raise PartitionClaimError(f"node {node} claims partition {claimed}; this run has partitions 0..{clients - 1}")
            if claimed in node_of:
                raise PartitionClaimError(
                    f"nodes {node_of[claimed]} and {node} both claim partition {claimed}; stop one, or set "
                    "flower.node_partitions (node id -> partition) to say which node serves which partition"
                )
            node_of[claimed] = node
        self.node_of = node_of
        log.info("partition ids known after %.1f s", time.perf_counter() - start)
        missing = sorted(set(range(clients)) - set(self.node_of))
        if missing:
            raise PartitionClaimError(f"no node serves clients {missing}; start one SuperNode per client (partition-id)")

    # -- training -----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent, self._bytes_down = {}, {}
        messages = []
        for client_id in self.server.sampled(server_round):
            payload, nbytes = self.server.payload(client_id)
            self._sent[client_id], self._bytes_down[client_id] = payload, nbytes
            content = RecordDict(
                {
                    "arrays": to_record(payload),
                    "config": settings_record(self.config, client_id, server_round),
                }
            )
            messages.append(Message(content, dst_node_id=self.node_of[client_id], message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        received: list[Reply] = []
        unreadable: dict[str, str] = {}
        failed: dict[int, str] = {}
        model_loads = 0
        for number, message in enumerate(replies):
            node = message.metadata.src_node_id
            if message.has_error():
                failed[node] = message.error.reason
                log.warning("round %d: node %d failed: %s", server_round, node, message.error.reason)
                continue
            reply = reply_from_message(message, self.node_of)
            if isinstance(reply, str):
                unreadable[f"node {node}#{number}"] = reply
                log.warning("round %d: dropped the reply of node %d: %s", server_round, node, reply)
                continue
            model_loads = max(model_loads, int(reply.metrics.pop("model_loads", 0)))
            received.append(reply)
        server_metrics = self.server.receive(server_round, received, self._sent)
        server_metrics["rejected"] = {**unreadable, **server_metrics["rejected"]}
        server_metrics["rejected_replies"] += len(unreadable)
        server_metrics["replies"] += len(unreadable)
        server_metrics["failed_replies"] = len(failed)
        server_metrics["model_loads"] = model_loads
        accepted = self.server.accepted
        row = round_row(server_round, self.method.name, accepted, self._bytes_down, self.server.fed.wire_dtype, server_metrics)
        row["compute_seconds"] = sum(r.metrics.get("compute_seconds", 0.0) for r in accepted)
        self.last_row = row
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return to_record(self.server.state), MetricRecord(scalars)

    # -- personalised evaluation (clients) ----------------------------------------------------
    def _evaluating(self, server_round: int) -> bool:
        return server_round % self.config.eval_every == 0 or server_round == self.config.rounds

    def evaluation_messages(self, server_round: int, export: bool = False) -> list[Message]:
        messages = []
        for client_id, node in sorted(self.node_of.items()):
            payload, _ = self.server.payload(client_id)
            # no paths: where a client writes is its data holder's choice (node config)
            settings = settings_record(self.config, client_id, server_round, export=export or None)
            messages.append(Message(RecordDict({"arrays": to_record(payload), "config": settings}), dst_node_id=node, message_type=MessageType.EVALUATE))
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not (self.method.has_local_parts and self.config.personalised_eval and self._evaluating(server_round)):
            return []
        return self.evaluation_messages(server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = [dict(r.content["metrics"]) for r in replies if not r.has_error()]
        if not results:
            return None
        names = [k for k in results[0] if k not in ("num-examples", "client-id")]
        return MetricRecord({f"personal_{k}": sum(r[k] for r in results) / len(results) for k in names})

    # -- the round loop -----------------------------------------------------------------------
    def run(self, grid: Grid, on_round: Callable[[dict[str, Any]], None], start_round: int = 1) -> None:
        self.discover(grid)
        timeout = self.config.flower.round_timeout
        for round_num in range(start_round, self.config.rounds + 1):
            round_start = time.perf_counter()
            replies = grid.send_and_receive(self.configure_train(round_num, ArrayRecord(), ConfigRecord(), grid), timeout=timeout)
            self.aggregate_train(round_num, replies)
            row = dict(self.last_row)
            train_seconds = time.perf_counter() - round_start
            eval_start = time.perf_counter()
            if self._evaluating(round_num) and self.global_eval is not None:
                row.update(self.global_eval())
            evaluation = self.configure_evaluate(round_num, ArrayRecord(), ConfigRecord(), grid)
            if evaluation:
                personal = self.aggregate_evaluate(round_num, grid.send_and_receive(evaluation, timeout=timeout))
                row.update(dict(personal or {}))
            row.update(
                {
                    "seconds": time.perf_counter() - round_start,
                    "train_seconds": train_seconds,
                    "eval_seconds": time.perf_counter() - eval_start,
                }
            )
            # the row first, then the checkpoint: a kill in between redoes this round on resume
            # (its row is dropped), where the other order would lose the row for good
            on_round(row)
            self.server.save_checkpoint()

    def export_personal(self, grid: Grid) -> None:
        """Ask every client to write its personal adapter (methods with local parts)."""
        if self.method.has_local_parts:
            grid.send_and_receive(self.evaluation_messages(self.config.rounds, export=True), timeout=self.config.flower.round_timeout)


# -- partition claims ---------------------------------------------------------------------------
class PartitionClaimError(RuntimeError):
    """The nodes' partition claims cannot make one node per client."""


def check_node_partitions(mapping: dict[int, int], clients: int) -> dict[int, int]:
    """``flower.node_partitions`` checked against the run: one node for each partition 0..clients-1."""
    if not mapping:
        return {}
    outside = sorted(p for p in mapping.values() if not 0 <= p < clients)
    if outside:
        raise ValueError(f"flower.node_partitions: partitions {outside} are outside 0..{clients - 1}")
    nodes_of: dict[int, list[int]] = {}
    for node, partition in mapping.items():
        nodes_of.setdefault(partition, []).append(node)
    shared = {p: n for p, n in sorted(nodes_of.items()) if len(n) > 1}
    if shared:
        partition, nodes = next(iter(shared.items()))
        raise ValueError(f"flower.node_partitions: nodes {nodes} are all assigned partition {partition}")
    missing = sorted(set(range(clients)) - set(nodes_of))
    if missing:
        raise ValueError(f"flower.node_partitions: no node is assigned partitions {missing}")
    return dict(mapping)


def wait_for_nodes(grid: Grid, wanted: set[int]) -> list[int]:
    """Block until every node in ``wanted`` is online; other online nodes are not used."""
    reported: tuple[list[int], list[int]] | None = None
    while True:
        online = set(grid.get_node_ids())
        missing, others = sorted(wanted - online), sorted(online - wanted)
        if not missing:
            if others:
                log.warning("nodes %s are online but not in flower.node_partitions; they get no messages", others)
            return sorted(wanted)
        if reported != (missing, others):
            log.info("waiting for nodes %s (flower.node_partitions)", missing)
            reported = (missing, others)
        time.sleep(1)


def claimed_partition(reply: Message) -> int | str:
    """The partition id a node's identify reply claims, or why there is none (one line)."""
    try:
        metrics = reply.content.get("metrics")
    except Exception as err:  # a malformed reply must not stop discovery with a traceback
        return f"unreadable reply ({type(err).__name__})"
    value = metrics.get("partition-id") if isinstance(metrics, MetricRecord) else None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"its reply has no integer partition-id (got {value!r:.40})"
    return value
