"""Every homogeneous method through the same contract, on plain tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from fedtune.methods import ClientUpload, data_weights
from fedtune.methods.fed_alora import FedALoRA
from fedtune.methods.full_weight import FedAvgFull
from fedtune.methods.lora_sharing import FedIT, FedSALoRA, FFALoRA
from fedtune.state import clone, weighted_average

D_IN, D_OUT, R = 6, 5, 3


def lora_state(seed: int, modules: tuple[str, ...] = ("l0.q", "l0.v")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[f"{m}.lora_A"] = torch.randn(R, D_IN, generator=g)
        state[f"{m}.lora_B"] = torch.randn(D_OUT, R, generator=g)
    state["classifier.weight"] = torch.randn(2, D_OUT, generator=g)
    return state


# name -> (method, keys uploaded, keys kept local, keys frozen), by suffix
CASES = {
    "fedit": (FedIT(), {"lora_A", "lora_B", "weight"}, set(), set()),
    "ffa-lora": (FFALoRA(), {"lora_B", "weight"}, set(), {"lora_A"}),
    "fedsa-lora": (FedSALoRA(), {"lora_A", "weight"}, {"lora_B"}, set()),
    "fed-alora": (FedALoRA(), {"lora_B", "weight"}, {"lora_A"}, set()),
    "fed-alora-local-head": (FedALoRA(head="local"), {"lora_B"}, {"lora_A", "weight"}, set()),
}


def suffixes(keys) -> set[str]:
    return {k.rsplit(".", 1)[1] for k in keys}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_upload_local_and_frozen_parts(case: str) -> None:
    method, uploaded, local, frozen = CASES[case]
    initial = lora_state(0)
    server = method.server_init(initial)
    received = method.download(server, client_id=0)
    start = method.client_start(received, method.client_init(initial), initial, 0)
    assert start.keys() == initial.keys()
    trained = {k: v + 1.0 if method.trains(k) else v for k, v in start.items()}
    upload, kept = method.client_finish(trained, start)
    assert suffixes(upload) == uploaded
    assert suffixes(kept) == local
    assert {k.rsplit(".", 1)[1] for k in start if not method.trains(k)} == frozen
    # what is downloaded is exactly what the server shares
    assert suffixes(received) == uploaded


def test_fedsa_never_uploads_b_and_fed_alora_never_uploads_a() -> None:
    initial = lora_state(0)
    for method, forbidden in ((FedSALoRA(), ".lora_B"), (FedALoRA(), ".lora_A")):
        trained = {k: v * 2 for k, v in initial.items()}
        upload, local = method.client_finish(trained, initial)
        assert not [k for k in upload if k.endswith(forbidden)]
        assert [k for k in local if k.endswith(forbidden)]


def test_data_weights_are_example_shares() -> None:
    uploads = [ClientUpload(0, 10, {}), ClientUpload(1, 30, {})]
    assert data_weights(uploads) == [0.25, 0.75]


def test_aggregate_is_weighted_mean_of_shared_keys_only() -> None:
    method = FedSALoRA()
    initial = lora_state(0)
    server = method.server_init(initial)
    a0, a1 = lora_state(1), lora_state(2)
    uploads = [
        ClientUpload(0, 1, method.client_finish(a0, initial)[0]),
        ClientUpload(1, 3, method.client_finish(a1, initial)[0]),
    ]
    new = method.aggregate(server, uploads)
    for key in new:
        assert key.endswith(("lora_A", "weight"))
        torch.testing.assert_close(new[key], 0.25 * a0[key] + 0.75 * a1[key])


def test_ffa_lora_aggregation_is_exact_and_fedit_is_not() -> None:
    """s (sum p B_k) A == sum p s B_k A for FFA-LoRA; FedIT's product of means differs."""
    scale = 2.0
    shared_a = torch.randn(R, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    bs = [torch.randn(D_OUT, R, dtype=torch.float64, generator=g) for _ in range(3)]
    a_s = [torch.randn(R, D_IN, dtype=torch.float64, generator=g) for _ in range(3)]
    p = [0.2, 0.3, 0.5]
    uploads = [ClientUpload(i, int(10 * w), {"m.lora_B": b}) for i, (w, b) in enumerate(zip(p, bs))]
    server = FFALoRA().aggregate({"m.lora_B": torch.zeros(D_OUT, R, dtype=torch.float64)}, uploads)
    ideal = sum(w * scale * b @ shared_a for w, b in zip(p, bs))
    torch.testing.assert_close(scale * server["m.lora_B"] @ shared_a, ideal, rtol=1e-12, atol=1e-12)

    fedit_uploads = [ClientUpload(i, int(10 * w), {"m.lora_A": a, "m.lora_B": b}) for i, (w, a, b) in enumerate(zip(p, a_s, bs))]
    fedit = FedIT().aggregate({}, fedit_uploads)
    ideal_fedit = sum(w * scale * b @ a for w, a, b in zip(p, a_s, bs))
    gap = float((scale * fedit["m.lora_B"] @ fedit["m.lora_A"] - ideal_fedit).norm() / ideal_fedit.norm())
    assert gap > 0.1, f"FedIT's product of averages should differ from the average of products (gap {gap})"


def test_full_weight_fedavg_is_weighted_mean_of_client_weights() -> None:
    method = FedAvgFull()
    g = torch.Generator().manual_seed(0)
    weights = [{"layer.weight": torch.randn(4, 4, generator=g), "layer.bias": torch.randn(4, generator=g)} for _ in range(3)]
    n = [5, 10, 25]
    assert all(method.trains(k) and method.is_shared(k) for k in weights[0])
    new = method.aggregate(clone(weights[0]), [ClientUpload(i, n_k, w) for i, (n_k, w) in enumerate(zip(n, weights))])
    for key in new:
        expected = sum(n_k / 40 * w[key] for n_k, w in zip(n, weights))
        torch.testing.assert_close(new[key], expected)


def test_fed_alora_reset_restarts_a_but_evaluates_with_own_a() -> None:
    initial = lora_state(0)
    trained_local = {k: v + 5 for k, v in initial.items() if k.endswith("lora_A")}
    received = {k: v for k, v in lora_state(1).items() if k.endswith("lora_B")}
    reset, keep = FedALoRA(a_persistence="reset"), FedALoRA(a_persistence="keep")
    for key in trained_local:
        torch.testing.assert_close(reset.client_start(received, trained_local, initial, 0)[key], initial[key])
        torch.testing.assert_close(keep.client_start(received, trained_local, initial, 0)[key], trained_local[key])
        torch.testing.assert_close(reset.personal_state(received, trained_local, initial, 0)[key], trained_local[key])
    for key in received:
        torch.testing.assert_close(reset.client_start(received, trained_local, initial, 0)[key], received[key])


def test_weighted_average_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.ones(1)}], [0.5, 0.5])


def _one_client_round(method, initial: dict, server: dict) -> tuple[dict, dict, dict]:
    received = method.download(server, client_id=0)
    start = method.client_start(received, method.client_init(initial), initial, 0)
    trained = {k: v + 1.0 if not k.startswith("_") and v.is_floating_point() and method.trains(k) else v for k, v in start.items()}
    upload, kept = method.client_finish(trained, start)
    return received, upload, kept


def test_methods_that_change_what_travels_by_round() -> None:
    """RoLoRA uploads B then A; FedSVD always B; FedEx-LoRA A, B and head, never its W."""
    from fedtune.methods.fedex_lora import FedExLoRA
    from fedtune.methods.frozen_factor import FedSVD, RoLoRA
    from fedtune.resources import RankPlan

    initial = lora_state(0)
    for method, per_round in (
        (RoLoRA(), [{"lora_B", "weight"}, {"lora_A", "weight"}, {"lora_B", "weight"}]),
        (FedSVD(), [{"lora_B", "weight"}] * 3),
    ):
        server = method.server_init(initial)
        for expected in per_round:
            received, upload, kept = _one_client_round(method, initial, server)
            assert suffixes(upload) == expected and kept == {}
            assert {"lora_A", "lora_B"} <= suffixes(received)  # both factors come down every round
            server = method.aggregate(server, [ClientUpload(0, 4, upload)])
    with_w = {**initial, **{f"{m}.base_layer.weight": torch.randn(D_OUT, D_IN) for m in ("l0.q", "l0.v")}}
    fedex = FedExLoRA(RankPlan((R,), R, 2.0 * R, False))
    server = fedex.server_init(with_w)
    for _ in range(2):
        received, upload, kept = _one_client_round(fedex, with_w, server)
        assert suffixes(upload) == {"lora_A", "lora_B", "weight"} and not any(k.endswith("base_layer.weight") for k in upload)
        assert {k for k in kept} == {f"{m}.base_layer.weight" for m in ("l0.q", "l0.v")}
        server = fedex.aggregate(server, [ClientUpload(0, 4, upload)])
