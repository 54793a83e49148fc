"""The embedded runtime: a whole federation in one process, one base model, swapped client states.

A run, top to bottom (``Simulator.run``):

1. build the federation (data, model, method) and the run directory;
2. each round: sample clients; for each, download -> train -> upload, keeping its local
   parts in the client store; aggregate; evaluate every ``eval_every`` rounds; append the
   round's metrics row, then checkpoint (server state + the clients' local states, one
   atomic commit), so ``run(resume=True)`` continues a killed run bit for bit;
3. export the global adapter (PEFT format), personal adapters, summary and plots.

Every random draw is derived from (seed, round, client) (``derive_seed``): no random stream
crosses a round boundary, so a checkpoint needs no RNG state to resume exactly.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedtune.config import RunConfig, dump_config
from fedtune.errors import UsageError
from fedtune.plots import plot_run
from fedtune.rundir import RunDir
from fedtune.runtime.engine import Federation, client_turn, describe, sample_clients
from fedtune.runtime.evaluation import PRIMARY_METRIC
from fedtune.runtime.server import FederatedServer, Reply, round_row
from fedtune.runtime.store import ClientCheckpoint, ClientStateStore
from fedtune.state import State, through_wire
from fedtune.tracking import Trackers


class Simulator:
    def __init__(self, fed: Federation, run_dir: RunDir | None = None) -> None:
        self.fed = fed
        self.config: RunConfig = fed.config
        self.method = fed.method
        self.run_dir = run_dir
        spill = (run_dir.path if run_dir else Path(tempfile.mkdtemp(prefix="fedtune-"))) / "client_state"
        self.store = ClientStateStore(int(self.config.store_memory_mb * 2**20), spill)
        checkpoint = run_dir.path / "checkpoint" if run_dir else None
        self.server_side = FederatedServer(fed, checkpoint_dir=checkpoint)
        self.client_checkpoint = ClientCheckpoint(checkpoint / "clients") if checkpoint else None
        self.history: list[dict[str, Any]] = []
        self.initial_metrics: dict[str, float] | None = None

    @property
    def server(self) -> State:
        return self.server_side.state

    # -- client state -----------------------------------------------------------------------
    def local_state(self, client_id: int) -> State:
        stored = self.store.get(client_id)
        if stored is not None:
            return stored
        return self.method.client_init(self.fed.initial_state(client_id))

    # -- one round --------------------------------------------------------------------------
    def run_round(self, round_num: int, step_bar: Callable[[], None] | None = None) -> dict[str, Any]:
        fed, config, server = self.fed, self.config, self.server_side
        round_start = time.perf_counter()
        sampled = server.sampled(round_num)
        replies: list[Reply] = []
        sent: dict[int, State] = {}
        bytes_down: dict[int, int] = {}
        compute, tokens = 0.0, 0
        on_gpu = fed.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(fed.device)
        for client_id in sampled:
            sent[client_id], bytes_down[client_id] = server.payload(client_id)
            turn = client_turn(fed, client_id, round_num, sent[client_id], self.local_state(client_id), on_step=step_bar)
            if turn.local:
                self.store.put(client_id, turn.local)
                if self.client_checkpoint is not None:
                    self.client_checkpoint.write(client_id, round_num, turn.local)
            n_k = fed.data.clients[client_id].num_examples
            replies.append(
                Reply(client_id, n_k, turn.upload, {"train_loss": turn.result.loss, "train_state_bytes": turn.result.train_state_bytes})
            )
            compute += turn.result.compute_seconds
            tokens += turn.result.tokens
        train_seconds = time.perf_counter() - round_start
        aggregate_start = time.perf_counter()
        server_metrics = server.receive(round_num, replies, sent)
        aggregate_seconds = time.perf_counter() - aggregate_start
        row = round_row(round_num, self.method.name, server.accepted, bytes_down, fed.wire_dtype, server_metrics)
        eval_start = time.perf_counter()
        if round_num % config.eval_every == 0 or round_num == config.rounds:
            row.update(self.evaluate_global())
            if config.lowrank_eval and len(set(config.client_ranks)) > 1:
                row.update({f"lowrank_{k}": v for k, v in self.evaluate_lowrank().items()})
            if self.method.has_local_parts and config.personalised_eval:
                row.update({f"personal_{k}": v for k, v in self.evaluate_personal().items()})
        eval_seconds = time.perf_counter() - eval_start
        row.update(
            {
                "seconds": time.perf_counter() - round_start,
                "train_seconds": train_seconds,
                "compute_seconds": compute,
                "aggregate_seconds": aggregate_seconds,
                "eval_seconds": eval_seconds,
                "train_tokens": tokens,
                "train_tokens_per_s": tokens / compute if compute > 0 else None,
            }
        )
        if on_gpu:  # the whole round: training, aggregation and evaluation
            row["gpu_peak_memory_bytes"] = torch.cuda.max_memory_allocated(fed.device)
        return row

    # -- evaluation -------------------------------------------------------------------------
    def global_state(self) -> State:
        return self.method.global_state(self.server, self.fed.initial_state())

    def _evaluate_state(self, state: State, examples: list, scored: list) -> dict[str, float]:
        return self.fed.evaluate(state, examples, scored)

    def evaluate_initial(self) -> dict[str, float]:
        """The model every client starts from, before any training (``eval_initial``)."""
        return self._evaluate_state(self.fed.initial_state(), self.fed.data.test, self.fed.data.scored_test)

    def evaluate_global(self) -> dict[str, float]:
        return self._evaluate_state(self.global_state(), self.fed.data.test, self.fed.data.scored_test)

    def evaluate_lowrank(self) -> dict[str, float]:
        """The global model as the lowest-rank client receives it (its start state), on the
        global test set: what heterogeneous methods lose when they hand the model down."""
        ranks = self.config.client_ranks
        client_id = ranks.index(min(ranks))
        received = through_wire(self.method.download(self.server, client_id), self.fed.wire_dtype)
        state = self.server_side.client_start(client_id, received)
        return self._evaluate_state(state, self.fed.data.test, self.fed.data.scored_test)

    def personal_state(self, client_id: int) -> State:
        received = through_wire(self.method.download(self.server, client_id), self.fed.wire_dtype)
        return self.method.personal_state(received, self.local_state(client_id), self.fed.initial_state(client_id), client_id)

    def evaluate_personal(self) -> dict[str, float]:
        """Each client's own model on its own test split; the plain mean over clients."""
        per_client: list[dict[str, float]] = []
        for client in self.fed.data.clients:
            if client.test:
                per_client.append(self._evaluate_state(self.personal_state(client.client_id), client.test, client.scored_test))
        if not per_client:
            return {}
        return {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}

    # -- the whole run ----------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        run_start = time.perf_counter()
        done = self._restore() if resume else 0
        if self.run_dir:
            self.run_dir.write_config(dump_config(self.config))
            if self.method.uses_lora and done == 0:
                self._save_initial_states()
        trackers = Trackers.open(self.config, self.run_dir.path if self.run_dir else None, resumed=resume)
        # deterministic, so a resumed run measures it again rather than storing it
        self.initial_metrics = self.evaluate_initial() if self.config.eval_initial else None
        try:
            summary = self._rounds(done, run_start, trackers)
        except BaseException:
            trackers.close()  # the trackers' runs end as failed; the error is the run's
            raise
        trackers.finish(summary)
        return summary

    def _rounds(self, done: int, run_start: float, trackers: Trackers) -> dict[str, Any]:
        config, fed = self.config, self.fed
        primary = PRIMARY_METRIC[fed.data.task.metric]
        cumulative_up = sum(r["bytes_up"] for r in self.history)
        cumulative_down = sum(r["bytes_down"] for r in self.history)
        rounds_bar = tqdm(range(done + 1, config.rounds + 1), desc=f"{self.method.name} rounds", disable=not config.progress)
        for round_num in rounds_bar:
            steps = sum(fed.steps_for_client(c) for c in sample_clients(config.clients, config.sampled_per_round, config.seed, round_num))
            with tqdm(total=steps, desc=f"round {round_num} local steps", leave=False, disable=not config.progress) as bar:
                row = self.run_round(round_num, step_bar=lambda: bar.update(1))
            cumulative_up += row["bytes_up"]
            cumulative_down += row["bytes_down"]
            row["cumulative_bytes_up"] = cumulative_up
            row["cumulative_bytes_down"] = cumulative_down
            self.history.append(row)
            if self.run_dir:
                self.run_dir.append_metrics(row)
                trackers.round(row)
                self._checkpoint()
                self.run_dir.commit()  # the new run has really started: the run it replaced goes
            if primary in row:
                rounds_bar.set_postfix({primary: f"{row[primary]:.4f}"})
        summary = self.summary(time.perf_counter() - run_start)
        if done:
            summary["resumed_after_round"] = done
        if self.run_dir:
            self._export()
            self.run_dir.write_summary(summary)
            plot_run(self.history, self.run_dir.path / "plots", primary, title=self.method.name)
        return summary

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        fed = self.fed
        primary = PRIMARY_METRIC[fed.data.task.metric]
        evaluated = [r for r in self.history if primary in r]
        final = evaluated[-1] if evaluated else {}
        better = min if primary == "loss" else max
        best = better(evaluated, key=lambda r: r[primary]) if evaluated else {}
        metric_keys = [k for k in final if k in ("accuracy", "loss", "perplexity", "mc_accuracy", "exact_match") or k.startswith("personal_")]
        return {
            "method": self.method.name,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "task_metric": fed.data.task.metric,
            "primary_metric": primary,
            "rounds": len(self.history),
            "clients": self.config.clients,
            "final": {k: final[k] for k in metric_keys},
            "best": {"round": best.get("round"), primary: best.get(primary)},
            "final_train_loss": self.history[-1]["train_loss"] if self.history else None,
            "total_bytes_up": sum(r["bytes_up"] for r in self.history),
            "total_bytes_down": sum(r["bytes_down"] for r in self.history),
            "bytes_up_per_client": _per_client_totals(self.history, "bytes_up_per_client"),
            "bytes_down_per_client": _per_client_totals(self.history, "bytes_down_per_client"),
            "wire_dtype": self.config.wire_dtype,
            "client_ranks": self.config.client_ranks if self.method.uses_lora else None,
            "wall_seconds": wall_seconds,
            "train_seconds": sum(r["train_seconds"] for r in self.history),
            "compute_seconds": sum(r["compute_seconds"] for r in self.history),
            "eval_seconds": sum(r["eval_seconds"] for r in self.history),
            **_throughput(self.history),
            **describe(fed),
            "device": str(fed.device),
            "accelerator": torch.cuda.get_device_name(fed.device) if fed.device.type == "cuda" else None,
            "seed": self.config.seed,
            **({"initial": self.initial_metrics} if self.initial_metrics else {}),
        }

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Commit the round: the metrics row is already written, so a kill before this
        rename redoes the round (its row is dropped on resume), a kill after it does not."""
        assert self.client_checkpoint is not None
        self.server_side.save_checkpoint({"clients": self.client_checkpoint.encode()})
        self.client_checkpoint.committed()

    def _restore(self) -> int:
        """Load the last checkpoint (server, clients, metrics rows); returns its round."""
        if self.run_dir is None or self.client_checkpoint is None:
            raise UsageError("resuming needs a run directory")
        done = self.server_side.load_checkpoint()
        if done > self.config.rounds:
            raise UsageError(f"--resume: the run in {self.run_dir.path} has done {done} rounds, more than rounds={self.config.rounds}")
        for client_id, state in self.client_checkpoint.restore(self.server_side.checkpoint_metadata.get("clients", "{}")).items():
            self.store.put(client_id, state)
        self.history = self.run_dir.keep_rounds(done)
        return done

    # -- outputs ----------------------------------------------------------------------------
    def _save_initial_states(self) -> None:
        assert self.run_dir is not None
        self.run_dir.save_state("initial/global.safetensors", self.fed.initial_state())
        if self.config.lora.init_seed_mode == "per_client":
            for client_id in range(self.config.clients):
                self.run_dir.save_state(f"initial/clients/{client_id}.safetensors", self.fed.initial_state(client_id))

    def _export(self) -> None:
        assert self.run_dir is not None
        fed = self.fed
        fed.save(self.global_state(), self.run_dir.path)
        if self.method.has_local_parts:
            for client in fed.data.clients:
                fed.save(self.personal_state(client.client_id), self.run_dir.path / "clients" / str(client.client_id))
        # the spilled client states were working files, not results
        if self.store.spill_dir.is_dir() and self.run_dir.path in self.store.spill_dir.parents:
            for f in self.store.spill_dir.glob("*.safetensors"):
                f.unlink()
            self.store.spill_dir.rmdir()



def _throughput(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Training tokens per second of compute, and the GPU's peak memory when there is one."""
    tokens = sum(r.get("train_tokens", 0) for r in history)
    compute = sum(r["compute_seconds"] for r in history)
    out: dict[str, Any] = {"train_tokens": tokens, "train_tokens_per_second": tokens / compute if compute > 0 else None}
    peaks = [r["gpu_peak_memory_bytes"] for r in history if "gpu_peak_memory_bytes" in r]
    if peaks:
        out["gpu_peak_memory_bytes"] = max(peaks)
    return out


def _per_client_totals(history: list[dict[str, Any]], field: str) -> dict[int, int]:
    totals: dict[int, int] = {}
    for row in history:
        for client, n in row[field].items():
            totals[int(client)] = totals.get(int(client), 0) + n
    return dict(sorted(totals.items()))
