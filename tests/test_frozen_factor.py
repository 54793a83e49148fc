"""RoLoRA and FedSVD against a plain-torch reference written from their formulas.

The reference keeps the global (A, B, head) itself, trains every sampled client by the same
seeded SGD the method's hooks see, and forms the aggregate from the papers' rules:

- RoLoRA: odd rounds B <- sum_k p_k B_k (A fixed), even rounds A <- sum_k p_k A_k (B fixed);
- FedSVD: B_bar = sum_k p_k B_k (A fixed), then A <- V^T[:r], B <- U[:, :r] S[:r] of B_bar A.

Four clients with unequal n_k, partial participation, two modules of different shapes,
five rounds, float64. The methods are driven only through download / client_start /
local_hooks / client_finish / aggregate.
"""

from __future__ import annotations

import pytest
import torch
from helpers import train_with_hooks
from torch.testing import assert_close

from fedtune.methods import ClientUpload
from fedtune.methods.frozen_factor import PHASE, FedSVD, RoLoRA

MODULES = {"enc.q": (6, 9), "enc.v": (11, 5)}  # module: (d_out, d_in)
R, HEAD = 3, "classifier.weight"
N = (30, 55, 10, 70)
SCHEDULE = [[0, 1, 2, 3], [1, 3], [0, 2, 3], [0, 1], [0, 1, 2, 3]]
LR, DECAY, STEPS = 0.1, 0.2, 3
F64 = torch.float64


def noise(shape, *seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(hash(seed) % 2**31), dtype=F64)


def grad_for(client: int, round_num: int):
    keys = sorted([m + s for m in MODULES for s in (".lora_A", ".lora_B")] + [HEAD])

    def grad(key: str, param: torch.Tensor, step: int) -> torch.Tensor:
        return DECAY * param + noise(param.shape, client, round_num, step, keys.index(key))

    return grad


def initial_state() -> dict[str, torch.Tensor]:
    state = {HEAD: noise((4, 6), 99)}
    for i, (m, (d_out, d_in)) in enumerate(MODULES.items()):
        state[m + ".lora_A"] = noise((R, d_in), 7, i)
        state[m + ".lora_B"] = torch.zeros(d_out, R, dtype=F64)  # LoRA's B = 0 start
    return state


def reference_sgd(x: torch.Tensor, key: str, client: int, round_num: int) -> torch.Tensor:
    grad = grad_for(client, round_num)
    for step in range(STEPS):
        x = x - LR * grad(key, x, step)
    return x


def reference_round(name: str, state: dict, round_num: int, clients: list[int]) -> dict:
    trains = "lora_B" if name == "fedsvd" or round_num % 2 == 1 else "lora_A"
    p = torch.tensor([N[k] for k in clients], dtype=F64)
    p = p / p.sum()
    new = dict(state)
    for key in state:
        if key.endswith(trains) or key == HEAD:
            new[key] = sum(p[i] * reference_sgd(state[key], key, k, round_num) for i, k in enumerate(clients))
    if name == "fedsvd":
        for m in MODULES:
            u, s, vh = torch.linalg.svd(new[m + ".lora_B"] @ state[m + ".lora_A"], full_matrices=False)
            u, s, vh = u[:, :R], s[:R], vh[:R]
            for i in range(R):  # the documented sign: v_i's largest-magnitude entry positive
                if vh[i, vh[i].abs().argmax()] < 0:
                    u[:, i], vh[i] = -u[:, i], -vh[i]
            new[m + ".lora_A"], new[m + ".lora_B"] = vh, u * s
    return new


def method_round(method, server: dict, round_num: int, clients: list[int]) -> tuple[dict, list[dict]]:
    uploads, sent = [], []
    for k in clients:
        received = method.download(server, k)
        start = method.client_start(received, {}, initial_state(), k)
        trained = train_with_hooks(method, start, {}, grad_for(k, round_num), steps=STEPS, lr=LR)
        upload, local = method.client_finish(trained, start)
        assert local == {}
        uploads.append(ClientUpload(k, N[k], upload))
        sent.append(received)
    return method.aggregate(server, uploads), [u.tensors for u in uploads]


@pytest.mark.parametrize("name", ["rolora", "fedsvd"])
def test_aggregate_follows_the_reference_over_rounds(name: str) -> None:
    method = {"rolora": RoLoRA, "fedsvd": FedSVD}[name]()
    server = method.server_init(initial_state())
    expected = initial_state()
    for round_num, clients in enumerate(SCHEDULE, start=1):
        trains = "lora_B" if name == "fedsvd" or round_num % 2 == 1 else "lora_A"
        assert int(method.download(server, 0)[PHASE]) == int(trains == "lora_A")
        server, uploads = method_round(method, server, round_num, clients)
        # only the trained factor (and the head) travels up
        assert all(set(u) == {HEAD} | {m + "." + trains for m in MODULES} for u in uploads)
        previous, expected = expected, reference_round(name, expected, round_num, clients)
        for m in MODULES:
            a, b = server[m + ".lora_A"], server[m + ".lora_B"]
            if name == "rolora":
                assert_close(a, expected[m + ".lora_A"])
                assert_close(b, expected[m + ".lora_B"])
            else:
                assert_close(a, expected[m + ".lora_A"])
                assert_close(b, expected[m + ".lora_B"])
                assert_close(a @ a.T, torch.eye(R, dtype=F64))  # A's rows orthonormal
        assert_close(server[HEAD], expected[HEAD])
        # exactness: the global product is the p-weighted mean of the clients' products
        p = torch.tensor([N[k] for k in clients], dtype=F64)
        p = p / p.sum()
        for m in MODULES:
            client_products = []
            for k in clients:
                a, b = previous[m + ".lora_A"], previous[m + ".lora_B"]
                if trains == "lora_A":
                    a = reference_sgd(a, m + ".lora_A", k, round_num)
                else:
                    b = reference_sgd(b, m + ".lora_B", k, round_num)
                client_products.append(b @ a)
            mean = sum(p[i] * client_products[i] for i in range(len(clients)))
            assert_close(server[m + ".lora_B"] @ server[m + ".lora_A"], mean)


def test_frozen_factor_does_not_move_during_local_training() -> None:
    method = RoLoRA()
    server = method.server_init(initial_state())
    for round_num in (1, 2):
        start = method.client_start(method.download(server, 0), {}, initial_state(), 0)
        trained = train_with_hooks(method, start, {}, grad_for(0, round_num), steps=STEPS, lr=LR)
        frozen = "lora_A" if round_num == 1 else "lora_B"
        for key in start:
            if key.endswith(frozen):
                assert torch.equal(trained[key], start[key])
            elif not key.startswith("_") and key != HEAD and round_num == 2:
                assert not torch.equal(trained[key], start[key])
        server = method.aggregate(server, [ClientUpload(0, 5, method.client_finish(trained, start)[0])])


def test_server_optimisers_are_refused_with_a_reason() -> None:
    for cls in (RoLoRA, FedSVD):
        assert cls.server_opt_refusal and "frozen" in cls.server_opt_refusal
