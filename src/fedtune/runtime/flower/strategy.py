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
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedtune.runtime.flower.client_app import settings_record
from fedtune.runtime.flower.records import from_record, to_record
from fedtune.runtime.server import FederatedServer, Reply, round_row
from fedtune.state import State

log = logging.getLogger("fedtune.flower.server")


class FedtuneStrategy(Strategy):
    def __init__(
        self,
        server: FederatedServer,
        state_dir: str | None = None,
        export_dir: str | None = None,
        global_eval: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.server = server
        self.config = server.config
        self.method = server.method
        self.state_dir = state_dir
        self.export_dir = export_dir
        self.global_eval = global_eval
        self.node_of: dict[int, int] = {}
        self._sent: dict[int, State] = {}
        self._bytes_down: dict[int, int] = {}

    def summary(self) -> None:
        log.info("fedtune strategy: method %s, %d clients, %d per round", self.method.name, self.config.clients, self.config.sampled_per_round)

    # -- which node is which client -----------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Wait for every client's node, then ask each for its partition id."""
        start = time.perf_counter()
        nodes, _ = sample_nodes(grid, self.config.clients, self.config.clients)
        log.info("%d nodes online after %.1f s", len(nodes), time.perf_counter() - start)
        queries = [
            Message(RecordDict({"config": ConfigRecord({"fedtune": "partition-id"})}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        for reply in grid.send_and_receive(queries, timeout=self.config.flower.round_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its partition: {reply.error.reason}")
            client_id = int(reply.content["metrics"]["partition-id"])
            self.node_of[client_id] = reply.metadata.src_node_id
        log.info("partition ids known after %.1f s", time.perf_counter() - start)
        missing = sorted(set(range(self.config.clients)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no node serves clients {missing}; start one SuperNode per client (partition-id)")

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
                    "config": settings_record(self.config, client_id, server_round, **{"state-dir": self.state_dir}),
                }
            )
            messages.append(Message(content, dst_node_id=self.node_of[client_id], message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        received: list[Reply] = []
        failed: dict[int, str] = {}
        model_loads = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = reply.error.reason
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            model_loads = max(model_loads, int(metrics.get("model-loads", 0)))
            received.append(
                Reply(
                    int(metrics["client-id"]),
                    int(metrics["num-examples"]),
                    from_record(reply.content["arrays"]),
                    {
                        "train_loss": float(metrics["train_loss"]),
                        "compute_seconds": float(metrics["compute_seconds"]),
                        "train_state_bytes": int(metrics.get("train_state_bytes", 0)),
                    },
                    source=f"node {node}",
                )
            )
        server_metrics = self.server.receive(server_round, received, self._sent)
        server_metrics["failed_replies"] = len(failed)
        server_metrics["model_loads"] = model_loads
        row = round_row(server_round, self.method.name, received, self._bytes_down, self.server.fed.wire_dtype, server_metrics)
        row["compute_seconds"] = sum(r.metrics.get("compute_seconds", 0.0) for r in received)
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
            settings = settings_record(
                self.config, client_id, server_round,
                **{"state-dir": self.state_dir, "export": export or None, "export-dir": self.export_dir if export else None},
            )  # fmt: skip
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
            self.server.save_checkpoint()
            on_round(row)

    def export_personal(self, grid: Grid) -> None:
        """Ask every client to write its personal adapter (methods with local parts)."""
        if self.method.has_local_parts:
            grid.send_and_receive(self.evaluation_messages(self.config.rounds, export=True), timeout=self.config.flower.round_timeout)
