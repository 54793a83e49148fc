"""Precision at the boundary: a float32 server whatever clients send; FLoRA's W bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import METHOD_CASES, tiny_overrides
from helpers import run_tiny

from fedtune.config import load_config
from fedtune.runtime.engine import build_federation
from fedtune.runtime.server import FederatedServer, Reply
from fedtune.state import BASE_SUFFIX

# every method that has a server state (local-only shares nothing)
CASES = {name: overrides for name, overrides in METHOD_CASES.items() if name != "local-only"}


def replies_for(server: FederatedServer, round_num: int, dtype: torch.dtype) -> tuple[list[Reply], dict]:
    """Each client's upload as its own client steps make it, moved a little, sent in ``dtype``."""
    replies, sent = [], {}
    g = torch.Generator().manual_seed(round_num)
    for client in server.sampled(round_num):
        sent[client], _ = server.payload(client)
        start = server.client_start(client, sent[client])
        trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() and not k.startswith("_") else v for k, v in start.items()}
        upload, _ = server.method.client_finish(trained, start)
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in upload.items()}
        replies.append(Reply(client, 10 + client, tensors))
    return replies, sent


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_half_precision_replies_leave_a_float32_server_state(cls_file: Path, case: str, wire: torch.dtype) -> None:
    """A deployed client may send bf16/fp16 arrays. The server widens them on arrival: its
    state stays float32 and equals the state built from the same values sent as float32."""
    config = load_config(None, tiny_overrides(cls_file, **CASES[case]))
    fed = build_federation(config)
    half, wide = FederatedServer(fed), FederatedServer(fed)
    for round_num in (1, 2):
        replies, sent = replies_for(half, round_num, wire)
        widened = [Reply(r.client_id, r.num_examples, {k: v.float() if v.is_floating_point() else v for k, v in r.tensors.items()}) for r in replies]
        assert half.receive(round_num, replies, sent)["aggregated"]
        assert wide.receive(round_num, widened, sent)["aggregated"]
        floating = {k: v.dtype for k, v in half.state.items() if v.is_floating_point()}
        assert floating and set(floating.values()) == {torch.float32}, floating
        assert half.state.keys() == wide.state.keys()
        for key in half.state:
            assert torch.equal(half.state[key], wide.state[key]), key


def test_flora_server_and_clients_hold_identical_weights_with_a_bf16_wire(cls_file: Path) -> None:
    """Half the clients a round: some are brought up to date by the last stack, others (who
    missed rounds) by the dense W. Either way their W must equal the server's bit for bit."""
    overrides = tiny_overrides(cls_file, method="flora", ranks="[2,4,4,8]", rounds=4, fraction=0.5, wire_dtype="bfloat16")
    sim, _ = run_tiny(overrides)
    server = sim.server_side
    merged = {k: v for k, v in sim.server.items() if k.endswith(BASE_SUFFIX)}
    assert merged
    behind = {c: int(sim.server["_flora.round"]) - int(sim.server["_flora.synced"][c]) for c in range(4)}
    assert 1 in behind.values() and any(b > 1 for b in behind.values()), behind  # both download paths
    for client in range(4):
        received, _ = server.payload(client)  # as it arrives: rounded to bf16
        start = sim.method.client_start(received, sim.local_state(client), sim.fed.initial_state(client), client)
        for key, value in merged.items():
            assert torch.equal(start[key], value), (client, behind[client], float((start[key] - value).abs().max()))
