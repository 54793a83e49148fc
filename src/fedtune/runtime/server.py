"""The server side of a federation, shared by the simulator and the Flower ServerApp.

``FederatedServer`` holds the method's server state and does everything a server does
between sending and receiving: sampling clients, building each client's payload, checking
each reply against what that client should send (dropping bad ones), optional central DP
(clipping + Gaussian noise + an RDP accountant), aggregation, and an atomic checkpoint
after every round so a stopped run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedtune.atomic import save_safetensors
from fedtune.errors import UsageError
from fedtune.methods import ClientUpload
from fedtune.methods.server_optimizers import ServerOptimizer
from fedtune.runtime.engine import Federation, derive_seed, sample_clients
from fedtune.runtime.safety import add_gaussian_noise, check_count, check_metrics, check_upload, clip_update
from fedtune.state import State, is_bookkeeping, num_bytes, through_wire

log = logging.getLogger("fedtune.server")



@dataclass
class Reply:
    """One client's answer to a training request, as the server received it."""

    client_id: int
    num_examples: int
    tensors: State
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""  # e.g. the Flower node id, for logs


def round_row(
    round_num: int,
    method: str,
    replies: list[Reply],
    bytes_down: dict[int, int],
    wire_dtype: torch.dtype,
    server_metrics: dict[str, Any],
) -> dict[str, Any]:
    """The metrics.jsonl row of a round's training phase (every runtime writes the same)."""
    total_n = sum(r.num_examples for r in replies)
    losses = [(r.metrics.get("train_loss", float("nan")), r.num_examples) for r in replies]
    bytes_up = {r.client_id: num_bytes(r.tensors, wire_dtype) for r in sorted(replies, key=lambda r: r.client_id)}
    return {
        "round": round_num,
        "method": method,
        "clients": sorted(bytes_down),
        "train_loss": sum(loss * n for loss, n in losses) / total_n if total_n else float("nan"),
        "num_examples": total_n,
        "bytes_up": sum(bytes_up.values()),
        "bytes_down": sum(bytes_down.values()),
        "bytes_up_per_client": bytes_up,
        "bytes_down_per_client": dict(sorted(bytes_down.items())),
        "client_train_state_bytes": max((int(r.metrics.get("train_state_bytes", 0)) for r in replies), default=0),
        **server_metrics,
    }


def _small_integer_values(tensor: torch.Tensor) -> tuple | None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.numel() > 256:
        return None
    return tuple(tensor.flatten().tolist())


class FederatedServer:
    def __init__(self, fed: Federation, checkpoint_dir: Path | None = None) -> None:
        self.fed = fed
        self.method = fed.method
        self.config = fed.config
        self.checkpoint_dir = checkpoint_dir
        self.state: State = self.method.server_init(fed.initial_state(None))
        self.completed_round = 0
        self._expected: dict[tuple, State] = {}
        #: the replies the last ``receive`` accepted (what a round's metrics row describes)
        self.accepted: list[Reply] = []
        self.accountant = self._make_accountant()
        self.server_opt = ServerOptimizer(self.config.server_opt)

    # -- sending -----------------------------------------------------------------------------
    def sampled(self, round_num: int) -> list[int]:
        return sample_clients(self.config.clients, self.config.sampled_per_round, self.config.seed, round_num)

    def payload(self, client_id: int) -> tuple[State, int]:
        """What client ``client_id`` receives (as it arrives, in wire precision) and its bytes."""
        payload = self.method.download(self.state, client_id)
        return through_wire(payload, self.fed.wire_dtype), num_bytes(payload, self.fed.wire_dtype)

    def client_start(self, client_id: int, received: State) -> State:
        """The start state of a client with no local history (the server's view of it)."""
        initial = self.fed.initial_state(client_id)
        return self.method.client_start(received, self.method.client_init(initial), initial, client_id)

    def expected_upload(self, client_id: int, received: State) -> State:
        """What this client's upload must look like: keys, shapes, dtypes (meta tensors, no data).

        Derived by running the method's own client steps on what the client received, so it
        follows every method's rules (a rank-r_k adapter, r_k HAFL components, ...). Cached
        per client, payload shapes and the values of small integer tensors (a phase flag or
        component indices decide which keys come back, at the same shapes).
        """
        signature = (client_id, tuple((k, tuple(v.shape), _small_integer_values(v)) for k, v in sorted(received.items())))
        if signature not in self._expected:
            if len(self._expected) > 4096:  # values that change every round: keep the cache bounded
                self._expected.clear()
            start = self.client_start(client_id, received)
            upload, _ = self.method.client_finish(dict(start), start)
            self._expected[signature] = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in upload.items()}
        return self._expected[signature]

    # -- receiving ---------------------------------------------------------------------------
    def check(self, reply: Reply, received: State) -> str | None:
        """None if the reply of a sampled client is usable, else why not (one line)."""
        config = self.config
        reason = check_count(reply.num_examples, "num_examples", config.max_client_examples) or check_metrics(reply.metrics)
        if reason:
            return reason
        expected = self.expected_upload(reply.client_id, received)
        return check_upload(
            reply.tensors,
            expected,
            max_components=config.server_rank if self.method.uses_lora else None,
            shrinkable_rank=self.method.name == "hetlora" and config.hetlora.self_pruning,
            max_norm=config.max_update_norm,
            max_abs=config.max_abs_value,
        ) or self.method.check_upload(reply.tensors, received, reply.client_id)

    def as_expected(self, reply: Reply, received: State) -> State:
        """The reply's tensors in the dtypes the server's own client steps produce (float32 for
        a float32 model): a bf16/fp16 upload is widened here, at the boundary, so aggregation
        and the server state never depend on the precision a client chose to send in."""
        expected = self.expected_upload(reply.client_id, received)
        return {k: v.to(expected[k].dtype) for k, v in reply.tensors.items()}

    def screen(self, replies: list[Reply], sent: dict[int, State]) -> tuple[list[Reply], dict[str, str]]:
        """The usable replies (one per sampled client, the first one received) and, for the
        others, why each was dropped. Nothing a reply holds can make this raise."""
        accepted: dict[int, Reply] = {}
        rejected: dict[str, str] = {}
        for number, reply in enumerate(replies):
            client = reply.client_id
            valid_id = isinstance(client, int) and not isinstance(client, bool) and client in sent
            if not valid_id:
                reason = f"client id {client!r:.40} was not sampled this round"
            elif client in accepted:
                reason = f"a second reply for client {client} this round"
            else:
                try:
                    reason = self.check(reply, sent[client])
                except Exception as err:  # a check that trips on odd input is still a rejection
                    reason = f"unreadable reply ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
            if reason is None:
                accepted[client] = reply
                continue
            label = str(client)[:40] if valid_id and str(client) not in rejected else f"{str(client)[:40]}#{number}"
            rejected[label] = reason
            log.warning("dropped a reply for client %s (%s): %s", str(client)[:40], reply.source, reason)
        return [accepted[c] for c in sorted(accepted)], rejected

    def receive(self, round_num: int, replies: list[Reply], sent: dict[int, State]) -> dict[str, Any]:
        """Check, (privatise,) aggregate. Returns the round's server-side metrics."""
        accepted, rejected = self.screen(replies, sent)
        self.accepted = accepted
        metrics: dict[str, Any] = {"replies": len(replies), "rejected_replies": len(rejected), "rejected": rejected}
        minimum = self.config.min_replies
        if len(accepted) < minimum:
            log.warning("round %d: %d valid replies < min_replies=%d; server state unchanged", round_num, len(accepted), minimum)
            metrics["aggregated"] = False
            self.completed_round = round_num
            return metrics
        uploads = [ClientUpload(r.client_id, r.num_examples, self.as_expected(r, sent[r.client_id])) for r in accepted]
        previous = self.state
        if self.config.dp.noise_multiplier > 0:
            metrics.update(self._aggregate_private(round_num, uploads, sent))
        else:
            self.state = self.method.aggregate(self.state, uploads)
        self.state = self.server_opt.step(previous, self.state)  # plain aggregation when none
        metrics["aggregated"] = True
        self.completed_round = round_num
        return metrics

    # -- central differential privacy --------------------------------------------------------
    def _make_accountant(self) -> Any:
        dp = self.config.dp
        if dp.noise_multiplier <= 0:
            return None
        from flwr.serverapp import RdpAccountant
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

        sampling = SamplingMethod.WITHOUT_REPLACEMENT if self.config.sampled_per_round < self.config.clients else SamplingMethod.NO_AMPLIFICATION
        relation = NeighboringRelation.REPLACE_ONE if sampling == SamplingMethod.WITHOUT_REPLACEMENT else NeighboringRelation.ADD_OR_REMOVE_ONE
        return RdpAccountant(PrivacyConfig(dp.delta, self.config.clients, relation, sampling))

    def _aggregate_private(self, round_num: int, uploads: list[ClientUpload], sent: dict[int, State]) -> dict[str, Any]:
        """Clip each client's update to C, average with equal weights, add N(0, (sigma C / K)^2)."""
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        dp = self.config.dp
        clipped_uploads, clipped = [], 0
        for upload in uploads:
            start = self.client_start(upload.client_id, sent[upload.client_id])
            reference = {k: start[k] for k in upload.tensors}
            tensors, was_clipped = clip_update(upload.tensors, reference, dp.clipping_norm)
            clipped += was_clipped
            # equal weights: the accountant's sensitivity analysis assumes them
            clipped_uploads.append(ClientUpload(upload.client_id, 1, tensors))
        self.state = self.method.aggregate(self.state, clipped_uploads)
        std = dp.noise_multiplier * dp.clipping_norm / len(uploads)
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, round_num, 0xD9))
        keys = sorted(uploads[0].tensors)
        self.state = add_gaussian_noise(self.state, keys, std, generator)
        self.accountant.compose(GaussianPrivacyEvent(dp.noise_multiplier, len(uploads), self.config.clients))
        epsilon = float(self.accountant.get_epsilon(dp.delta))
        return {"dp_clipped": clipped, "dp_noise_std": std, "dp_epsilon": epsilon, "dp_delta": dp.delta}

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_file(self) -> Path | None:
        return self.checkpoint_dir / "server.safetensors" if self.checkpoint_dir else None

    def save_checkpoint(self, extra: dict[str, str] | None = None) -> None:
        """Atomic: a temporary file renamed over the previous checkpoint. ``extra`` metadata
        (a runtime's own bookkeeping, e.g. which client-state files belong to this round)
        commits with the server state in the same rename."""
        if self.checkpoint_file is None:
            return
        metadata = {"completed_round": str(self.completed_round), "method": self.method.name, **(extra or {})}
        if self.accountant is not None:
            metadata["accountant"] = json.dumps(self.accountant.state_dict())
        save_safetensors(self.checkpoint_file, self.state, metadata)

    def load_checkpoint(self) -> int:
        """Restore the last complete round's state; returns that round (0: no checkpoint).
        The checkpoint's metadata stays in ``checkpoint_metadata``."""
        self.checkpoint_metadata: dict[str, str] = {}
        if self.checkpoint_file is None or not self.checkpoint_file.exists():
            return 0
        from safetensors import safe_open

        try:
            with safe_open(str(self.checkpoint_file), "pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(self.checkpoint_file))
        except Exception as err:
            raise UsageError(f"checkpoint {self.checkpoint_file} is unreadable ({type(err).__name__})") from None
        if metadata.get("method") != self.method.name:
            raise UsageError(f"checkpoint is from method {metadata.get('method')!r}, not {self.method.name!r}")
        self.state = state
        self.completed_round = int(metadata["completed_round"])
        self.checkpoint_metadata = metadata
        if self.accountant is not None and "accountant" in metadata:
            self.accountant.load_state_dict(json.loads(metadata["accountant"]))
        return self.completed_round

    def model_state(self) -> State:
        return {k: v for k, v in self.state.items() if not is_bookkeeping(k)}
