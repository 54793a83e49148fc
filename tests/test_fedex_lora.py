"""FedEx-LoRA against a plain-torch reference of its formulas, over rounds with partial participation.

Reference (float64): A_bar = sum_k p_k A_k, B_bar = sum_k p_k B_k and
W <- W + s (sum_k p_k B_k A_k - B_bar A_bar), W a (d_out x d_in) nn.Linear weight, never
transposed. Every client starts each round from (W, A_bar, B_bar) of the server, bit for bit,
whether it was sent the residual's factors (it took part last round) or the dense W.
"""

from __future__ import annotations

import pytest
import torch
from helpers import train_with_hooks
from torch.testing import assert_close

from fedtune.methods import ClientUpload
from fedtune.methods.fedex_lora import STACK_A, STACK_B, FedExLoRA
from fedtune.resources import RankPlan

MODULES = {"enc.q": (7, 5), "enc.v": (4, 9)}  # non-square, so a transposed residual cannot fit
R, ALPHA, HEAD = 3, 12.0, "classifier.weight"
S = ALPHA / R
N = (25, 60, 10, 45)
# client 3 misses rounds 2-3 (dense W in round 4, the stack in 5); client 2 misses round 2 (dense in 3)
SCHEDULE = [[0, 1, 2, 3], [0, 1], [0, 1, 2], [0, 2, 3], [1, 2, 3]]
F64 = torch.float64


def noise(shape, *seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(hash(seed) % 2**31), dtype=F64)


def initial_state() -> dict[str, torch.Tensor]:
    state = {HEAD: noise((3, 4), 1)}
    for i, (m, (d_out, d_in)) in enumerate(MODULES.items()):
        state[m + ".lora_A"] = noise((R, d_in), 2, i)
        state[m + ".lora_B"] = torch.zeros(d_out, R, dtype=F64)
        state[m + ".base_layer.weight"] = noise((d_out, d_in), 3, i)
    return state


def grad_for(client: int, round_num: int):
    def grad(key: str, param: torch.Tensor, step: int) -> torch.Tensor:
        return 0.3 * param + noise(param.shape, client, round_num, step, len(key), param.shape[0])

    return grad


def sgd(x: torch.Tensor, key: str, client: int, round_num: int, steps: int = 3, lr: float = 0.1) -> torch.Tensor:
    grad = grad_for(client, round_num)
    for step in range(steps):
        x = x - lr * grad(key, x, step)
    return x


def method(wire: torch.dtype = torch.float32) -> FedExLoRA:
    return FedExLoRA(RankPlan((R,) * len(N), R, ALPHA, False), wire_dtype=wire)


def test_aggregate_and_client_start_follow_the_reference() -> None:
    fedex = method()
    server = fedex.server_init(initial_state())
    local = {k: {} for k in range(len(N))}
    ref = {k: v.clone() for k, v in initial_state().items()}
    last_round_of = {k: 0 for k in range(len(N))}
    for round_num, clients in enumerate(SCHEDULE, start=1):
        uploads, trained_by = [], {}
        for k in clients:
            received = fedex.download(server, k)
            # the residual's factors only for a client that took part in the last aggregation
            has_stack = any(key.endswith(STACK_A) for key in received)
            has_dense = any(key.endswith(".base_layer.weight") for key in received)
            assert has_stack == (round_num > 1 and last_round_of[k] == round_num - 1), (round_num, k)
            assert has_dense == (round_num > 1 and last_round_of[k] < round_num - 1), (round_num, k)
            start = fedex.client_start(received, local[k], initial_state(), k)
            for key, value in ref.items():  # W exactly the server's, A and B its averages
                assert_close(start[key], value, msg=lambda e, key=key: f"round {round_num} client {k} {key}: {e}")
            for m in MODULES:
                assert torch.equal(start[m + ".base_layer.weight"], server[m + ".base_layer.weight"])
            trained = train_with_hooks(fedex, start, local[k], grad_for(k, round_num))
            upload, local[k] = fedex.client_finish(trained, start)
            assert not any(key.endswith(".base_layer.weight") for key in upload)  # W never goes up
            uploads.append(ClientUpload(k, N[k], upload))
            trained_by[k] = {key: sgd(ref[key], key, k, round_num) for key in ref if not key.endswith(".base_layer.weight")}
            last_round_of[k] = round_num
        server = fedex.aggregate(server, uploads)
        p = torch.tensor([N[k] for k in clients], dtype=F64)
        p = p / p.sum()
        for m in MODULES:
            a_k = [trained_by[k][m + ".lora_A"] for k in clients]
            b_k = [trained_by[k][m + ".lora_B"] for k in clients]
            a_bar = sum(p[i] * a_k[i] for i in range(len(clients)))
            b_bar = sum(p[i] * b_k[i] for i in range(len(clients)))
            mean_update = sum(p[i] * b_k[i] @ a_k[i] for i in range(len(clients)))
            w_old = ref[m + ".base_layer.weight"]
            ref[m + ".base_layer.weight"] = w_old + S * (mean_update - b_bar @ a_bar)
            ref[m + ".lora_A"], ref[m + ".lora_B"] = a_bar, b_bar
            # the point of the method: the global model is the clients' exact mean update
            w, a, b = server[m + ".base_layer.weight"], server[m + ".lora_A"], server[m + ".lora_B"]
            assert_close(w + S * b @ a, w_old + S * mean_update)
        ref[HEAD] = sum(p[i] * trained_by[k][HEAD] for i, k in enumerate(clients))
        for key, value in ref.items():
            assert_close(server[key], value, msg=lambda e, key=key: f"server after round {round_num} {key}: {e}")


def test_residual_factors_cost_what_they_carry() -> None:
    fedex = method()
    server = fedex.server_init(initial_state())
    uploads = []
    for k in range(len(N)):
        start = fedex.client_start(fedex.download(server, k), {}, initial_state(), k)
        uploads.append(ClientUpload(k, N[k], fedex.client_finish(train_with_hooks(fedex, start, {}, grad_for(k, 1)), start)[0]))
    server = fedex.aggregate(server, uploads)
    payload = fedex.download(server, 0)
    for m, (d_out, d_in) in MODULES.items():
        assert payload[m + STACK_A].shape == (len(N) * R, d_in) and payload[m + STACK_B].shape == (d_out, len(N) * R)
    assert set(payload) == {HEAD} | {m + s for m in MODULES for s in (".lora_A", ".lora_B", STACK_A, STACK_B)}


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_half_precision_wire_keeps_server_and_clients_bit_identical(wire: torch.dtype) -> None:
    from fedtune.state import through_wire

    fedex = method(wire)
    server = fedex.server_init(initial_state())
    local = {k: {} for k in range(len(N))}
    for round_num, clients in enumerate(SCHEDULE, start=1):
        uploads = []
        for k in clients:
            start = fedex.client_start(through_wire(fedex.download(server, k), wire), local[k], initial_state(), k)
            for m in MODULES:
                # round 1's A is the shared init, which the wire rounds; from then on the server keeps rounded averages
                for suffix in (".base_layer.weight", ".lora_A", ".lora_B") if round_num > 1 else (".base_layer.weight",):
                    assert torch.equal(start[m + suffix], server[m + suffix]), (round_num, k, suffix)
            upload, local[k] = fedex.client_finish(train_with_hooks(fedex, start, local[k], grad_for(k, round_num)), start)
            uploads.append(ClientUpload(k, N[k], through_wire(upload, wire)))
        server = fedex.aggregate(server, uploads)


def test_export_folds_the_adapter_into_the_weights() -> None:
    fedex = method()
    state = initial_state()
    for m in MODULES:
        state[m + ".lora_B"] = noise(state[m + ".lora_B"].shape, 9)
    merged = fedex.export_state(state)
    for m in MODULES:
        assert m + ".lora_A" not in merged
        assert_close(merged[m + ".base_layer.weight"], state[m + ".base_layer.weight"] + S * state[m + ".lora_B"] @ state[m + ".lora_A"])
