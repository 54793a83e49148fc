"""SCAFFOLD against a plain-torch reference of its update rules, over rounds.

Reference (float64), per corrected tensor: a client starts from x with controls c, c_k, takes
K steps y <- y - lr d(g(y) - c_k + c) (d the identity for SGD, an elementwise rescaling for an
Adam-like optimizer), sets c_k+ = mean_t g(y_t) (``mean-gradient``) or c_k - c + (x - y) / (K lr)
(``option-ii``); the server sets x <- sum_k p_k y_k (the wrapped FedIT's mean) and
c <- c + (1/N) sum_k (c_k+ - c_k). Four clients, unequal n_k, partial participation, five
rounds; FedIT and FedSA-LoRA inside.
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


def sgd(g: torch.Tensor) -> torch.Tensor:
    return g


def rescaled(g: torch.Tensor) -> torch.Tensor:
    """An Adam-like step: about one unit per coordinate whatever the gradient's size."""
    return g / (g.abs() + 1e-3)


@pytest.mark.parametrize("inner_cls", [FedIT, FedSALoRA], ids=["fedit", "fedsa-lora"])
@pytest.mark.parametrize(
    ("control", "direction"),
    [("mean-gradient", sgd), ("option-ii", sgd), ("mean-gradient", rescaled), ("option-ii", rescaled)],
    ids=["mean-gradient-sgd", "option-ii-sgd", "mean-gradient-adamlike", "option-ii-adamlike"],
)
def test_scaffold_follows_the_reference_over_rounds(inner_cls, control, direction) -> None:
    method = Scaffold(inner_cls(), lr=LR, clients=len(N), control=control)
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
            trained = train_with_hooks(method, start, local[k], grad_for(k, round_num), steps=STEPS, lr=LR, direction=direction)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, N[k], upload))
            # the reference client
            grad = grad_for(k, round_num)
            y = {key: v.clone() for key, v in x.items()}
            y.update({key: v.clone() for key, v in personal[k].items()})
            raw_sum = {key: torch.zeros_like(v) for key, v in x.items()}
            for step in range(STEPS):
                raw = {key: grad(key, v, step) for key, v in y.items()}
                for key in x:
                    raw_sum[key] += raw[key]
                y = {key: v - LR * direction(raw[key] + ((c[key] - c_k[k][key]) if key in x else 0)) for key, v in y.items()}
            option_ii = {key: c_k[k][key] - c[key] + (x[key] - y[key]) / (STEPS * LR) for key in x}
            mean_gradient = {key: raw_sum[key] / STEPS for key in x}
            if direction is sgd:  # the identity the default rests on: option II is the mean gradient under SGD
                for key in x:
                    assert_close(option_ii[key], mean_gradient[key])
            new_c_k = mean_gradient if control == "mean-gradient" else option_ii
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


def test_under_an_adaptive_step_option_ii_leaves_gradient_units() -> None:
    """Why mean-gradient is the default: with an Adam-like step, option II's control is about
    1/K-step-sized units per coordinate, far from a gradient of size 1e-2; the mean gradient is it."""
    small = lambda key, param, step: 1e-2 * torch.ones_like(param)  # noqa: E731
    controls = {}
    for control in ("mean-gradient", "option-ii"):
        method = Scaffold(FedIT(), lr=LR, clients=len(N), control=control)
        server = method.server_init(initial_state())
        start = method.client_start(method.download(server, 0), {}, initial_state(), 0)
        trained = train_with_hooks(method, start, {}, small, steps=STEPS, lr=LR, direction=rescaled)
        upload = method.client_finish(trained, start)[0]
        controls[control] = upload[DELTA_C + "enc.q.lora_A"]  # c_k = 0 before: Delta c_k is c_k+
    assert_close(controls["mean-gradient"], torch.full((3, 6), 1e-2, dtype=F64))
    assert controls["option-ii"].min() > 0.9  # ~ 1 / (1 + 0.1): ninety times the gradient


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
    assert method.control == "mean-gradient"  # the default
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
