"""Server optimisers against a plain-torch reference of Reddi et al.'s formulas, over rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from fedtune.config import load_config
from fedtune.errors import UsageError
from fedtune.methods.server_optimizers import ServerOptimizer, ServerOptSettings
from fedtune.runtime.engine import build_federation
from fedtune.runtime.server import FederatedServer, Reply

SETTINGS = dict(lr=0.3, momentum=0.8, beta1=0.7, beta2=0.95, tau=0.01)


def reference(name: str, x0: torch.Tensor, aggregates: list[torch.Tensor]) -> list[torch.Tensor]:
    """x_t from the aggregates x_bar_t, written out from the formulas (float64)."""
    s = SETTINGS
    x, m, v, out = x0.double(), torch.zeros_like(x0, dtype=torch.float64), torch.zeros_like(x0, dtype=torch.float64), []
    for x_bar in aggregates:
        delta = x_bar.double() - x
        if name == "fedavgm":
            m = s["momentum"] * m + delta
            x = x + s["lr"] * m
        else:
            if name == "fedadagrad":
                v = v + delta**2
            elif name == "fedyogi":
                v = v - (1 - s["beta2"]) * delta**2 * torch.sign(v - delta**2)
            else:
                v = s["beta2"] * v + (1 - s["beta2"]) * delta**2
            m = s["beta1"] * m + (1 - s["beta1"]) * delta
            x = x + s["lr"] * m / (v.sqrt() + s["tau"])
        out.append(x.clone())
    return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_each_optimiser_follows_its_formula_over_rounds(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g)
    aggregates = [x0 + 0.5 * torch.randn(5, 3, generator=g) * (t + 1) for t in range(4)]
    optimiser = ServerOptimizer(ServerOptSettings(name=name, **SETTINGS))
    state = {"m.lora_A": x0, "_bookkeeping": torch.tensor(3)}
    for t, expected in enumerate(reference(name, x0, aggregates)):
        # what the method's aggregate returns: its new tensor, the server's other keys as they were
        state = optimiser.step(state, {**state, "m.lora_A": aggregates[t]})
        torch.testing.assert_close(state["m.lora_A"].double(), expected, rtol=1e-5, atol=1e-6)
        assert int(state["_bookkeeping"]) == 3  # bookkeeping is never optimised


def test_none_is_plain_aggregation() -> None:
    aggregate = {"w": torch.randn(3)}
    assert ServerOptimizer(ServerOptSettings()).step({"w": torch.zeros(3)}, aggregate) is aggregate


def test_fedadam_on_a_federation_moves_the_fedit_average_and_checkpoints_its_moments(cls_file: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny_overrides(cls_file, method="fedit", **{"server_opt.name": "fedadam", **{f"server_opt.{k}": v for k, v in SETTINGS.items()}}))
    server = FederatedServer(build_federation(config), checkpoint_dir=tmp_path / "ck")
    key = next(k for k in server.state if k.endswith("lora_A"))
    x = [server.state[key].clone()]
    aggregates = []
    for round_num in (1, 2, 3):
        replies, sent = [], {}
        for client in server.sampled(round_num):
            sent[client], _ = server.payload(client)
            start = server.client_start(client, sent[client])
            upload, _ = server.method.client_finish({k: v + 0.05 * (client + round_num) for k, v in start.items()}, start)
            replies.append(Reply(client, 10 + 5 * client, upload))
        total = sum(r.num_examples for r in replies)
        aggregates.append(sum(r.num_examples / total * r.tensors[key] for r in replies))  # FedIT: the p-weighted mean
        server.receive(round_num, replies, sent)
        x.append(server.state[key].clone())
    expected = [x[0]]
    m = v = torch.zeros_like(x[0], dtype=torch.float64)
    for t, x_bar in enumerate(aggregates):  # each round's delta is from the optimiser's own last x
        delta = x_bar.double() - x[t].double()
        v = SETTINGS["beta2"] * v + (1 - SETTINGS["beta2"]) * delta**2
        m = SETTINGS["beta1"] * m + (1 - SETTINGS["beta1"]) * delta
        expected.append(x[t].double() + SETTINGS["lr"] * m / (v.sqrt() + SETTINGS["tau"]))
    for got, want in zip(x[1:], expected[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    server.save_checkpoint()
    resumed = FederatedServer(build_federation(config), checkpoint_dir=tmp_path / "ck")
    resumed.load_checkpoint()
    assert any(k.startswith("_server_opt.m.") for k in resumed.state) and torch.equal(resumed.state[key], server.state[key])


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_methods_without_an_average_refuse_a_server_optimiser(cls_file: Path, method: str) -> None:
    with pytest.raises(UsageError, match=f"server_opt.name=fedadam has no meaning for {method}"):
        build_federation(load_config(None, tiny_overrides(cls_file, method=method, ranks="[2,4,4,4]", **{"server_opt.name": "fedadam"})))


# -- FedProx ----------------------------------------------------------------------------------------
def test_fedprox_term_is_mu_half_squared_distance_on_trained_shared_tensors() -> None:
    from fedtune.methods.client_corrections import client_hooks
    from fedtune.methods.fed_alora import FedALoRA

    g = torch.Generator().manual_seed(1)
    start = {"m.lora_A": torch.randn(2, 3, generator=g), "m.lora_B": torch.randn(4, 2, generator=g), "head.weight": torch.randn(2, 4, generator=g)}
    method = FedALoRA()  # B and head shared, A kept on the client
    params = {k: torch.nn.Parameter(v + 0.1 * (i + 1)) for i, (k, v) in enumerate(start.items())}
    hooks = client_hooks(method, start, {}, fedprox_mu=0.4)
    loss = hooks.extra_loss(params)
    expected = 0.2 * sum(((params[k].detach() - start[k]) ** 2).sum() for k in ("m.lora_B", "head.weight"))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert params["m.lora_A"].grad is None  # the personal A is not pulled towards anything
    torch.testing.assert_close(params["m.lora_B"].grad, 0.4 * (params["m.lora_B"].detach() - start["m.lora_B"]))
    assert client_hooks(method, start, {}, fedprox_mu=0.0) is None  # off: the method's own hooks (none)


def test_fedprox_keeps_local_training_closer_to_the_received_model(cls_file: Path) -> None:
    from helpers import run_tiny

    def drift(mu: float) -> float:
        sim, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=1, local_steps=6, lr=0.05, **{"fedprox.mu": mu}))
        initial = sim.fed.initial_state(None)
        return sum(float(((sim.server[k] - initial[k]) ** 2).sum()) for k in sim.server if k.endswith("lora_A"))

    assert drift(50.0) < 0.5 * drift(0.0)
