"""The server's defences and central DP, without any network (FederatedServer directly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny

from fedtune.config import load_config
from fedtune.errors import UsageError
from fedtune.runtime.engine import build_federation
from fedtune.runtime.safety import check_upload, clip_update
from fedtune.runtime.server import FederatedServer, Reply
from fedtune.state import max_abs_diff


@pytest.fixture
def server(cls_file: Path) -> FederatedServer:
    return FederatedServer(build_federation(load_config(None, tiny_overrides(cls_file, method="fedit", max_update_norm=100.0))))


def good_reply(server: FederatedServer, client: int) -> tuple[Reply, dict]:
    sent, _ = server.payload(client)
    upload, _ = server.method.client_finish(server.client_start(client, sent), server.client_start(client, sent))
    return Reply(client, 10, {k: v + 0.01 for k, v in upload.items()}), sent


def corrupt(tensors: dict, kind: str) -> dict:
    key = sorted(tensors)[0]
    bad = dict(tensors)
    if kind == "wrong key":
        bad["bert.nonexistent.lora_A"] = bad.pop(key)
    elif kind == "missing key":
        bad.pop(key)
    elif kind == "wrong shape":
        bad[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    elif kind == "NaN":
        bad[key] = tensors[key].clone().fill_(float("nan"))
    elif kind == "inf":
        bad[key] = tensors[key].clone().fill_(float("inf"))
    elif kind == "huge norm":
        bad[key] = tensors[key] + 1e4
    elif kind == "wrong dtype":
        bad[key] = tensors[key].to(torch.int64)
    return bad


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong key", "unexpected key"),
        ("missing key", "missing key"),
        ("wrong shape", "does not fit expected"),
        ("NaN", "non-finite"),
        ("inf", "non-finite"),
        ("huge norm", "exceeds the bound"),
        ("wrong dtype", "not a float wire dtype"),
    ],
)
def test_each_malformed_reply_is_rejected_and_the_round_goes_on(server: FederatedServer, kind: str, reason: str) -> None:
    replies, sent = [], {}
    for client in range(3):
        reply, sent[client] = good_reply(server, client)
        replies.append(reply)
    replies[1] = Reply(1, 10, corrupt(replies[1].tensors, kind))
    before = dict(server.state)
    metrics = server.receive(1, replies, sent)
    assert metrics["rejected_replies"] == 1 and reason in metrics["rejected"]["1"]
    assert metrics["aggregated"] and max_abs_diff(before, server.state) > 0
    assert all(torch.isfinite(v).all() for v in server.state.values())


def test_too_few_valid_replies_leave_the_state_unchanged(cls_file: Path) -> None:
    server = FederatedServer(build_federation(load_config(None, tiny_overrides(cls_file, method="fedit", min_replies=2))))
    reply, sent = good_reply(server, 0)
    bad = Reply(1, 10, corrupt(reply.tensors, "NaN"))
    before = dict(server.state)
    metrics = server.receive(1, [reply, bad], {0: sent, 1: sent})
    assert not metrics["aggregated"]
    assert max_abs_diff(before, server.state) == 0


def test_heterogeneous_shapes_are_checked_per_client(cls_file: Path) -> None:
    server = FederatedServer(build_federation(load_config(None, tiny_overrides(cls_file, method="hetlora", ranks="[2,4,8,8]"))))
    reply0, sent0 = good_reply(server, 0)
    reply2, _ = good_reply(server, 2)
    assert server.check(reply0, sent0) is None
    # a rank-8 upload from the rank-2 client does not fit
    assert "does not fit" in (server.check(Reply(0, 10, reply2.tensors), sent0) or "")


def test_index_validation() -> None:
    expected = {"m.hafl_index": torch.tensor([0, 1], dtype=torch.int32)}
    assert check_upload({"m.hafl_index": torch.tensor([3, 1], dtype=torch.int32)}, expected, max_components=4) is None
    assert "out of range" in check_upload({"m.hafl_index": torch.tensor([4, 1], dtype=torch.int32)}, expected, max_components=4)
    assert "repeated" in check_upload({"m.hafl_index": torch.tensor([1, 1], dtype=torch.int32)}, expected, max_components=4)
    assert "integer" in check_upload({"m.hafl_index": torch.tensor([1.0, 0.0])}, expected, max_components=4)


def test_clipping_bounds_the_update_norm() -> None:
    reference = {"a": torch.zeros(3), "b": torch.ones(2)}
    upload = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # update norm 5
    clipped, was = clip_update(upload, reference, 1.0)
    assert was
    update = torch.cat([clipped["a"] - reference["a"], clipped["b"] - reference["b"]])
    assert float(update.norm()) == pytest.approx(1.0)
    same, was = clip_update(upload, reference, 10.0)
    assert not was and torch.equal(same["a"], upload["a"])


def test_dp_run_reports_growing_epsilon_and_changes_the_result(cls_file: Path) -> None:
    plain, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=3))
    private, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=3, **{"dp.noise_multiplier": 1.0, "dp.clipping_norm": 0.5}))
    epsilons = [r["dp_epsilon"] for r in private.history]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0 and epsilons[-1] > epsilons[0]
    assert all(r["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 4) for r in private.history)
    assert max_abs_diff(plain.server, private.server) > 0


def test_dp_refuses_non_linear_aggregation(cls_file: Path) -> None:
    with pytest.raises(UsageError, match="central DP needs a mean-aggregating method"):
        run_tiny(tiny_overrides(cls_file, method="flexlora", ranks="[2,4,8,8]", **{"dp.noise_multiplier": 1.0}))


def test_checkpoint_round_trip(cls_file: Path, tmp_path: Path) -> None:
    fed = build_federation(load_config(None, tiny_overrides(cls_file, method="hetlora", ranks="[2,4,8,8]")))
    server = FederatedServer(fed, checkpoint_dir=tmp_path)
    replies, sent = [], {}
    for client in range(4):
        reply, sent[client] = good_reply(server, client)
        replies.append(reply)
    server.receive(1, replies, sent)
    server.save_checkpoint()
    assert not list(tmp_path.glob("*.tmp"))
    restored = FederatedServer(fed, checkpoint_dir=tmp_path)
    assert restored.load_checkpoint() == 1
    assert max_abs_diff(restored.state, server.state) == 0


HONEST_RUNS = {
    "fedit": {},
    "ffa-lora": {},
    "fedsa-lora": {},
    "fed-alora": {},
    "local-only": {},
    "fedavg-full": {},
    "fedavg-galore": {"galore.rank": 2},
    "hetlora": {"ranks": "[2,4,8,8]"},
    "hetlora-pruning": {"method": "hetlora", "ranks": "[2,4,8,8]", "hetlora.self_pruning": "true", "hetlora.prune_lambda": 1.0},
    "flexlora": {"ranks": "[2,4,8,8]"},
    "flora": {"ranks": "[2,4,8,8]"},
    "fed-alora-decomposed": {"method": "fed-alora", "ranks": "[2,4,8,8]"},
    "hafl": {"ranks": "[2,4,8,8]"},
    "hafl-truncation": {"method": "hafl", "ranks": "[2,4,8,8]", "hafl.scheme": "truncation"},
}


@pytest.mark.parametrize("name", HONEST_RUNS, ids=list(HONEST_RUNS))
def test_honest_clients_are_never_rejected(cls_file: Path, name: str) -> None:
    """The server's expectations follow each method's own rules, client by client."""
    extra = {"method": name, **HONEST_RUNS[name]}
    simulator, _ = run_tiny(tiny_overrides(cls_file, rounds=3, max_update_norm=1e6, **extra))
    for row in simulator.history:
        assert row["rejected_replies"] == 0, row["rejected"]
        assert row["aggregated"]
