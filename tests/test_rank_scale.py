"""One rank scale: what a rank-r_k client trained at s(r_k) is what the server's model means.

A round with a single uploading client must leave the global Delta W equal to that client's
trained Delta W = s(r_k) B_k A_k, for every heterogeneous method, with and without rsLoRA.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.methods import ClientUpload
from fedtune.methods.fed_alora import FedALoRADecomposed
from fedtune.methods.flexlora import FlexLoRA
from fedtune.methods.flora import FLoRA
from fedtune.methods.hafl import HAFL, HAFLSettings
from fedtune.methods.hetlora import HetLoRA
from fedtune.resources import RankPlan

D_OUT, D_IN, R_MAX, ALPHA = 12, 10, 8, 16.0
RANKS = (2, 4, 8)


def s(rank: int, rslora: bool) -> float:
    return ALPHA / (math.sqrt(rank) if rslora else rank)


def lora(rank: int, seed: int, zero_b: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(D_OUT, rank, dtype=torch.float64) if zero_b else torch.randn(D_OUT, rank, generator=g, dtype=torch.float64)
    return {"m.lora_A": torch.randn(rank, D_IN, generator=g, dtype=torch.float64), "m.lora_B": b}


def trained_from(start: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) if k.endswith(("lora_A", "lora_B")) else v for k, v in start.items()}


def delta_w(state: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    return scale * state["m.lora_B"] @ state["m.lora_A"]


def one_client_round(method, client: int, initial_server: dict, client_initial: dict):
    server = method.server_init(initial_server)
    received = method.download(server, client)
    start = method.client_start(received, {}, client_initial, client)
    trained = trained_from(start, seed=7)
    upload, _ = method.client_finish(trained, start)
    return server, method.aggregate(server, [ClientUpload(client, 17, upload)]), trained


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("client", [0, 1], ids=["rank2", "rank4"])
@pytest.mark.parametrize("name", ["hetlora", "hafl-truncation", "hafl-freezing", "flexlora"])
def test_single_client_round_moves_the_global_delta_w_by_what_it_trained(name: str, client: int, rslora: bool) -> None:
    plan = RankPlan(RANKS, R_MAX, ALPHA, rslora)
    method = {
        "hetlora": lambda: HetLoRA(plan),
        "hafl-truncation": lambda: HAFL(plan, HAFLSettings(scheme="truncation")),
        "hafl-freezing": lambda: HAFL(plan, HAFLSettings(scheme="freezing")),
        "flexlora": lambda: FlexLoRA(plan),
    }[name]()
    held_rank = R_MAX if name == "hafl-freezing" else RANKS[client]  # freezing clients hold all r
    initial = lora(R_MAX, seed=1)  # B = 0: the global model starts at Delta W = 0
    _, server, trained = one_client_round(method, client, initial, lora(held_rank, seed=2))
    global_state = method.global_state(server, initial)
    expected = delta_w(trained, s(held_rank, rslora))
    if name == "hafl-freezing":  # only the client's trained components reach the server
        chosen = trained[next(k for k in trained if k.startswith("_hafl.chosen."))]
        expected = s(R_MAX, rslora) * trained["m.lora_B"][:, chosen] @ trained["m.lora_A"][chosen]
    torch.testing.assert_close(delta_w(global_state, s(R_MAX, rslora)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_flora_merges_each_client_delta_w_at_its_own_scale(rslora: bool) -> None:
    plan = RankPlan(RANKS, R_MAX, ALPHA, rslora)
    method = FLoRA(plan)
    w0 = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    initial = {"m.base_layer.weight": w0} | lora(2, seed=4)
    _, server, trained = one_client_round(method, 0, initial, initial)
    torch.testing.assert_close(server["m.base_layer.weight"] - w0, delta_w(trained, s(2, rslora)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_fed_alora_decomposed_b_base_means_the_same_for_every_rank(rslora: bool) -> None:
    """Each client applies s(r_k) to B_base + B2 B1: after one rank-2 client's round, every
    client's s(r_j) * (the B_base it receives) equals s(2) (B_base + B2 B1) as it trained."""
    d_m = 5
    plan = RankPlan(RANKS, R_MAX, ALPHA, rslora)
    method = FedALoRADecomposed(plan=plan)
    g = torch.Generator().manual_seed(5)
    server = method.server_init({"m.alora_B_base": torch.randn(D_OUT, d_m, generator=g, dtype=torch.float64)})
    received = method.download(server, 0)
    start = {"m.alora_B1": torch.randn(2, d_m, generator=g, dtype=torch.float64), "m.alora_B2": torch.zeros(D_OUT, 2, dtype=torch.float64)}
    start |= received
    trained = dict(start) | {"m.alora_B2": torch.randn(D_OUT, 2, generator=g, dtype=torch.float64)}
    upload, _ = method.client_finish(trained, start)
    new = method.aggregate(server, [ClientUpload(0, 9, upload)])
    as_trained = s(2, rslora) * (trained["m.alora_B_base"] + trained["m.alora_B2"] @ trained["m.alora_B1"])
    for client, rank in enumerate(RANKS):
        torch.testing.assert_close(s(rank, rslora) * method.download(new, client)["m.alora_B_base"], as_trained, rtol=1e-10, atol=1e-10)
