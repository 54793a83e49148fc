"""SCAFFOLD against a plain-torch reference of its update rules (option II), over rounds.

Reference (float64), per corrected tensor: a client starts from x with controls c, c_k, takes
K SGD steps y <- y - lr (g(y) - c_k + c), sets c_k+ = c_k - c + (x - y) / (K lr); the server
sets x <- sum_k p_k y_k (the wrapped FedIT's mean) and c <- c + (1/N) sum_k (c_k+ - c_k).
Four clients, unequal n_k, partial participation, five rounds; FedIT and FedSA-LoRA inside.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import train_with_hooks
from torch.testing import assert_close

from fedtune.config import load_config
from fedtune.errors import UsageError
from fedtune.methods import ClientUpload
from fedtune.methods.lora_sharing import FedIT, FedSALoRA
from fedtune.methods.scaffold import DELTA_C, SENT_C, Scaffold
from fedtune.runtime.engine import build_federation
from fedtune.state import num_bytes

N = (20, 70, 35, 15)
SCHEDULE = [[0, 1, 2, 3], [1, 2], [0, 3], [0, 1, 2], [2, 3]]
LR, STEPS = 0.05, 4
F64 = torch.float64


def noise(shape, *seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(hash(seed) % 2**31), dtype=F64)


def initial_state() -> dict[str, torch.Tensor]:
    return {
        "enc.q.lora_A": noise((3, 6), 1),
        "enc.q.lora_B": noise((5, 3), 2),
        "classifier.weight": noise((2, 5), 3),
    }


def grad_for(client: int, round_num: int):
    # client-specific curvature and drift, so the controls matter
    def grad(key: str, param: torch.Tensor, step: int) -> torch.Tensor:
        return (0.2 + 0.3 * client) * param + noise(param.shape, client, round_num, step, len(key))

    return grad


@pytest.mark.parametrize("inner_cls", [FedIT, FedSALoRA], ids=["fedit", "fedsa-lora"])
def test_scaffold_follows_the_reference_over_rounds(inner_cls) -> None:
    method = Scaffold(inner_cls(), lr=LR, clients=len(N))
    inner = inner_cls()
    shared = [k for k in initial_state() if inner.is_shared(k)]
    server = method.server_init(initial_state())
    local = {k: {} for k in range(len(N))}
    x = {k: v.clone() for k, v in initial_state().items() if k in shared}
    c = {k: torch.zeros_like(v) for k, v in x.items()}
    c_k = {client: {k: torch.zeros_like(v) for k, v in x.items()} for client in range(len(N))}
    personal = {client: {k: v.clone() for k, v in initial_state().items() if k not in shared} for client in range(len(N))}
    for round_num, clients in enumerate(SCHEDULE, start=1):
        uploads, ys, deltas = [], {}, {}
        for k in clients:
            received = method.download(server, k)
            assert set(received) == set(shared) | {SENT_C + key for key in shared}  # c comes down, counted
            start = method.client_start(received, local[k], initial_state(), k)
            trained = train_with_hooks(method, start, local[k], grad_for(k, round_num), steps=STEPS, lr=LR)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, N[k], upload))
            # the reference client
            grad = grad_for(k, round_num)
            y = {key: v.clone() for key, v in x.items()}
            y.update({key: v.clone() for key, v in personal[k].items()})
            for step in range(STEPS):
                y = {key: v - LR * (grad(key, v, step) + ((c[key] - c_k[k][key]) if key in x else 0)) for key, v in y.items()}
            new_c_k = {key: c_k[k][key] - c[key] + (x[key] - y[key]) / (STEPS * LR) for key in x}
            deltas[k] = {key: new_c_k[key] - c_k[k][key] for key in x}
            c_k[k] = new_c_k
            ys[k] = y
            personal[k] = {key: v for key, v in y.items() if key not in x}
            for key in x:
                assert_close(upload[key], y[key], msg=lambda e, key=key: f"round {round_num} client {k} {key}: {e}")
                assert_close(upload[DELTA_C + key], deltas[k][key])
            for key, value in personal[k].items():  # FedSA's B stays on the client, uncorrected
                assert_close(local[k][key], value)
        server = method.aggregate(server, uploads)
        p = torch.tensor([N[k] for k in clients], dtype=F64)
        p = p / p.sum()
        x = {key: sum(p[i] * ys[k][key] for i, k in enumerate(clients)) for key in x}
        c = {key: c[key] + sum(deltas[k][key] for k in clients) / len(N) for key in c}
        glob = method.global_state(server, initial_state())
        for key in x:
            assert_close(glob[key], x[key])
            assert_close(method.download(server, 0)[SENT_C + key], c[key])
    assert any(v.abs().max() > 0 for v in c.values())  # the controls really moved


def test_without_correction_round_one_is_the_wrapped_method() -> None:
    """c = c_k = 0 in round 1: SCAFFOLD's first aggregate is FedIT's."""
    scaffold, fedit = Scaffold(FedIT(), lr=LR, clients=len(N)), FedIT()
    for method in (scaffold, fedit):
        server = method.server_init(initial_state())
        uploads = []
        for k in range(len(N)):
            start = method.client_start(method.download(server, k), {}, initial_state(), k)
            trained = train_with_hooks(method, start, {}, grad_for(k, 1), steps=STEPS, lr=LR)
            uploads.append(ClientUpload(k, N[k], method.client_finish(trained, start)[0]))
        server = method.aggregate(server, uploads)
        method.result = method.global_state(server, initial_state())
    for key, value in fedit.result.items():
        assert torch.equal(scaffold.result[key], value)


def test_scaffold_doubles_what_travels(cls_file: Path) -> None:
    config = load_config(None, tiny_overrides(cls_file, method="fedit", **{"scaffold.enabled": "true"}))
    fed = build_federation(config)
    method = fed.method
    assert method.name == "fedit+scaffold"
    server = method.server_init(fed.initial_state(None))
    payload = method.download(server, 0)
    model_part = {k: v for k, v in payload.items() if not k.startswith(SENT_C)}
    assert num_bytes(payload) == 2 * num_bytes(model_part)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "flexlora", "ranks": "[2,4,8,8]"}, "mean of the uploads"),
        ({"method": "fedit", "dp.noise_multiplier": 1.0, "dp.clipping_norm": 1.0}, "central DP"),
    ],
)
def test_scaffold_refuses_what_it_cannot_correct(cls_file: Path, overrides: dict, message: str) -> None:
    config = load_config(None, tiny_overrides(cls_file, **{"scaffold.enabled": "true", **overrides}))
    with pytest.raises(UsageError, match=message):
        build_federation(config)
