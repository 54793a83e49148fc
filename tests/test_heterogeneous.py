"""Heterogeneous client ranks: HetLoRA, FlexLoRA, FLoRA, Fed-ALoRA's decomposition, HAFL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny
from peft import PeftModel

from fedtune.config import load_config
from fedtune.data.encode import collate
from fedtune.methods import ClientUpload
from fedtune.methods.flexlora import FlexLoRA, dense_reference_svd, low_rank_svd, stacked_factors
from fedtune.methods.flora import FLoRA, stack
from fedtune.methods.hafl import (
    CHOSEN,
    HAFL,
    INDEX_SUFFIX,
    HAFLSettings,
    component_scores,
    top_components,
    update_importance,
)
from fedtune.methods.hetlora import HetLoRA, zero_padding_average
from fedtune.models import load_model
from fedtune.resources import RankPlan, assign_ranks, tier_counts
from fedtune.runtime.engine import build_federation, client_turn
from fedtune.runtime.simulator import Simulator
from fedtune.state import num_bytes

D_OUT, D_IN = 12, 10


def factors(rank: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D_OUT, rank, generator=g, dtype=dtype), torch.randn(rank, D_IN, generator=g, dtype=dtype)


# -- client resources --------------------------------------------------------------------------
def test_rank_tiers_assignment_is_seeded_and_exact() -> None:
    assert tier_counts({4: 0.4, 8: 0.3, 16: 0.3}, 10) == {4: 4, 8: 3, 16: 3}
    first = assign_ranks({4: 0.4, 8: 0.3, 16: 0.3}, 10, 8, seed=1)
    assert sorted(first) == [4] * 4 + [8] * 3 + [16] * 3
    assert first == assign_ranks({4: 0.4, 8: 0.3, 16: 0.3}, 10, 8, seed=1)
    assert first != assign_ranks({4: 0.4, 8: 0.3, 16: 0.3}, 10, 8, seed=2)
    assert assign_ranks([2, 4, 8, 8], 4, 8, 0) == [2, 4, 8, 8]
    config = load_config(None, ["clients=4", "ranks=[2,4,8,8]"])
    assert config.client_ranks == [2, 4, 8, 8] and config.server_rank == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clients=3", "ranks=[2,4]"], "ranks lists 2 ranks for 3 clients"),
        (["ranks=[0,4]", "clients=2"], "every rank must be > 0"),
        (["clients=2", "ranks=[4,8]", "r_max=4"], "below the largest client rank"),
    ],
)
def test_bad_rank_configs(overrides: list[str], message: str) -> None:
    from fedtune.errors import UsageError

    with pytest.raises(UsageError, match=message):
        load_config(None, overrides)


def test_homogeneous_method_refuses_mixed_ranks(cls_file: Path) -> None:
    from fedtune.errors import UsageError

    with pytest.raises(UsageError, match="needs equal client ranks"):
        build_federation(load_config(None, tiny_overrides(cls_file, method="fedit", ranks="[2,4,8,8]")))


# -- HetLoRA -------------------------------------------------------------------------------------
def test_hetlora_truncation_takes_the_first_components() -> None:
    plan = RankPlan((2, 4), server_rank=4)
    method = HetLoRA(plan)
    b, a = factors(4, 0)
    server = method.server_init({"m.lora_A": a, "m.lora_B": b})
    received = method.download(server, 0)
    assert received["m.lora_A"].shape == (2, D_IN) and received["m.lora_B"].shape == (D_OUT, 2)
    # B at the rank-2 client's scale: s(2) B_k = s(4) B[:, :2], s = 16 / r
    assert torch.equal(received["m.lora_A"], a[:2]) and torch.equal(received["m.lora_B"], b[:, :2] * 0.5)


def test_hetlora_rank_r_client_never_holds_more_than_r_components(cls_file: Path) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method="hetlora", ranks="[2,4,8,8]", rounds=2))
    for client, rank in enumerate([2, 4, 8, 8]):
        received = sim.method.download(sim.server, client)
        assert all(v.shape[0] == rank for k, v in received.items() if k.endswith("lora_A"))
        initial = sim.fed.initial_state(client)
        assert all(v.shape[0] == rank for k, v in initial.items() if k.endswith("lora_A"))
    per_client = sim.history[0]["bytes_up_per_client"]
    assert per_client[0] < per_client[1] < per_client[2] == per_client[3]


def test_zero_padding_norm_weights() -> None:
    b1, a1 = factors(2, 1)
    b2, a2 = factors(4, 2)
    uploads = [ClientUpload(0, 1, {"m.lora_A": a1, "m.lora_B": b1}), ClientUpload(1, 1, {"m.lora_A": a2, "m.lora_B": b2})]
    n1, n2 = float(torch.linalg.matrix_norm(b1 @ a1)), float(torch.linalg.matrix_norm(b2 @ a2))
    out = zero_padding_average(uploads, 4, "norm")
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    torch.testing.assert_close(out["m.lora_A"][:2], w1 * a1 + w2 * a2[:2])
    torch.testing.assert_close(out["m.lora_A"][2:], w2 * a2[2:])  # diluted by the zero padding
    data = zero_padding_average(uploads, 4, "data_size")
    torch.testing.assert_close(data["m.lora_B"][:, 2:], 0.5 * b2[:, 2:])


# -- FlexLoRA ------------------------------------------------------------------------------------
def _flex_inputs(ranks: list[int]):
    p = torch.tensor([float(r) for r in ranks])
    p = (p / p.sum()).tolist()
    bs, as_ = zip(*[factors(r, 10 + i) for i, r in enumerate(ranks)])
    coefficients = [p_k * (16 / r) for p_k, r in zip(p, ranks)]
    return bs, as_, coefficients


def test_flexlora_fast_path_matches_dense_reference() -> None:
    bs, as_, c = _flex_inputs([2, 3, 4])
    p_mat, q_mat = stacked_factors(bs, as_, c)
    w_g = sum(ck * b @ a for ck, b, a in zip(c, bs, as_))
    torch.testing.assert_close(p_mat @ q_mat, w_g)
    for rank in (1, 3, 5, 9):
        u, s, vh = low_rank_svd(p_mat, q_mat, rank)
        ud, sd, vhd = dense_reference_svd(p_mat, q_mat, rank)
        fast, dense = (u * s) @ vh, (ud * sd) @ vhd
        assert float((fast - dense).norm() / dense.norm()) <= 1e-5
        torch.testing.assert_close(s, sd)


def test_flexlora_large_client_recovers_global_update_and_ranks_fit() -> None:
    ranks = [2, 3, 4, 9]  # 9 >= 2 + 3 + 4: the full-rank client gets W_g exactly
    plan = RankPlan(tuple(ranks), server_rank=9, alpha=16.0)
    method = FlexLoRA(plan)
    uploads = []
    w_g = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for i, r in enumerate(ranks[:3]):
        b, a = factors(r, 20 + i)
        uploads.append(ClientUpload(i, 10 * (i + 1), {"m.lora_A": a, "m.lora_B": b}))
        w_g += (10 * (i + 1) / 60) * plan.scale(r) * b @ a
    server = method.server_init({"m.lora_A": torch.zeros(9, D_IN, dtype=torch.float64), "m.lora_B": torch.zeros(D_OUT, 9, dtype=torch.float64)})
    server = method.aggregate(server, uploads)
    for client, r in enumerate(ranks):
        got = method.download(server, client)
        assert got["m.lora_A"].shape == (r, D_IN) and got["m.lora_B"].shape == (D_OUT, r)
    big = method.download(server, 3)
    torch.testing.assert_close(plan.scale(9) * big["m.lora_B"] @ big["m.lora_A"], w_g, rtol=1e-10, atol=1e-10)
    small = method.download(server, 0)
    u, s, vh = torch.linalg.svd(w_g)
    torch.testing.assert_close(plan.scale(2) * small["m.lora_B"] @ small["m.lora_A"], (u[:, :2] * s[:2]) @ vh[:2])


# -- FLoRA ---------------------------------------------------------------------------------------
def test_flora_stacking_is_exact_and_download_grows_with_clients() -> None:
    ranks = [2, 3, 4]
    plan = RankPlan(tuple(ranks), server_rank=4, alpha=8.0)
    uploads = []
    for i, r in enumerate(ranks):
        b, a = factors(r, 30 + i)
        uploads.append(ClientUpload(i, i + 1, {"m.lora_A": a, "m.lora_B": b}))
    stacked = stack(uploads, plan)
    expected = sum((u.num_examples / 6) * plan.scale(r) * u.tensors["m.lora_B"] @ u.tensors["m.lora_A"] for u, r in zip(uploads, ranks))
    torch.testing.assert_close(stacked["m.lora_B"] @ stacked["m.lora_A"], expected, rtol=1e-12, atol=1e-12)
    assert stacked["m.lora_A"].shape == (sum(ranks), D_IN)

    method = FLoRA(plan)
    base = {"m.base_layer.weight": torch.zeros(D_OUT, D_IN, dtype=torch.float64)}
    sizes = []
    for k in (1, 2, 3):
        server = method.aggregate(method.server_init(base), uploads[:k])
        sizes.append(num_bytes(method.download(server, 0)))
        torch.testing.assert_close(server["m.base_layer.weight"], stack(uploads[:k], plan)["m.lora_B"] @ stack(uploads[:k], plan)["m.lora_A"])
    assert sizes[0] < sizes[1] < sizes[2]


def test_flora_clients_track_the_merged_weights(cls_file: Path) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method="flora", ranks="[2,4,4,8]", rounds=3, fraction=0.5))
    merged = {k: v for k, v in sim.server.items() if k.endswith("base_layer.weight")}
    initial = sim.fed.initial_state(None)
    assert any(not torch.equal(v, initial[k]) for k, v in merged.items()), "updates were merged into W"
    # local training moves only the fresh LoRA, never the merged weights
    assert not [k for k in merged if sim.method.trains(k)]
    fed = sim.fed
    received = sim.method.download(sim.server, 0)
    turn = client_turn(fed, 0, 9, received, sim.local_state(0))
    after = fed.binding.read()
    for key in merged:
        assert torch.equal(after[key], turn.local[key])
    # a client brought up to date (by stack or dense weights) holds exactly the server's W
    for client in range(4):
        received = sim.method.download(sim.server, client)
        start = sim.method.client_start(received, sim.local_state(client), sim.fed.initial_state(client), client)
        for key, value in merged.items():
            assert torch.equal(start[key], value)


# -- Fed-ALoRA, heterogeneous --------------------------------------------------------------------
@pytest.mark.parametrize("ranks", ["[2,4,8,8]", "[1,1,16,3]"])
def test_fed_alora_b_base_is_d_out_by_d_m_for_any_ranks(cls_file: Path, ranks: str) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method="fed-alora", ranks=ranks, **{"fed_alora.d_m": 6}))
    assert sim.method.name == "fed-alora-decomposed"
    bases = {k: v for k, v in sim.server.items() if k.endswith("alora_B_base")}
    assert bases and all(v.shape == (32, 6) for v in bases.values())
    assert any(v.abs().sum() > 0 for v in bases.values()), "client updates were folded into B_base"
    for client in range(4):
        assert sim.method.download(sim.server, client).keys() == sim.server.keys()


def test_fed_alora_decomposed_adapter_exports_to_peft(cls_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sim, _ = run_tiny(tiny_overrides(cls_file, method="fed-alora", ranks="[2,4,8,8]"), out)
    fed = sim.fed
    batch = collate(fed.data.test[:4], fed.pad_id)
    for client in (0, 2):
        fed.binding.load(sim.personal_state(client))
        with torch.no_grad():
            ours = fed.binding.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        base = load_model("tiny-bert", "classification", fed.data.task.num_labels, seed=fed.config.seed).model
        peft_model = PeftModel.from_pretrained(base, out / "clients" / str(client) / "adapter").eval()
        assert peft_model.peft_config["default"].r == [2, 4, 8, 8][client]
        with torch.no_grad():
            theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_hetlora_global_adapter_exports_at_r_max(cls_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sim, _ = run_tiny(tiny_overrides(cls_file, method="hetlora", ranks="[2,4,8,8]"), out)
    fed = sim.fed
    batch = collate(fed.data.test[:4], fed.pad_id)
    fed.binding.load(sim.global_state())
    with torch.no_grad():
        ours = fed.binding.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = load_model("tiny-bert", "classification", fed.data.task.num_labels, seed=fed.config.seed).model
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert peft_model.peft_config["default"].r == 8
    with torch.no_grad():
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# -- HAFL ----------------------------------------------------------------------------------------
def test_importance_ema_matches_hand_computation() -> None:
    w = torch.tensor([[2.0, -1.0]])
    g = torch.tensor([[0.5, 3.0]])
    ibar, ubar = torch.zeros(1, 2), torch.zeros(1, 2)
    ibar, ubar = update_importance(ibar, ubar, w, g, 0.85, 0.85)
    # I = |w g| = [1, 3]; Ibar = 0.15 I = [0.15, 0.45]; Ubar = 0.15 |I - Ibar| = [0.1275, 0.3825]
    torch.testing.assert_close(ibar, torch.tensor([[0.15, 0.45]]))
    torch.testing.assert_close(ubar, torch.tensor([[0.1275, 0.3825]]))
    ibar, ubar = update_importance(ibar, ubar, w, torch.tensor([[1.0, 0.0]]), 0.85, 0.85)
    # I = [2, 0]; Ibar = 0.85 [0.15, 0.45] + 0.15 [2, 0] = [0.4275, 0.3825]
    # Ubar = 0.85 [0.1275, 0.3825] + 0.15 |[2, 0] - Ibar| = [0.344250, 0.382500]
    torch.testing.assert_close(ibar, torch.tensor([[0.4275, 0.3825]]))
    torch.testing.assert_close(ubar, torch.tensor([[0.34425, 0.3825]]))
    scores = component_scores(score_a=torch.tensor([[1.0, 3.0], [0.0, 0.0]]), score_b=torch.tensor([[2.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([1.0 + 2.0, 2.0 + 0.0]))


def test_top_components_keeps_the_highest_scores() -> None:
    assert top_components(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert top_components(torch.zeros(4), 2).tolist() == [0, 1]  # no scores yet: the first r_k


def _hafl_uploads(server_rank: int = 3) -> tuple[dict, list[ClientUpload]]:
    b0, a0 = factors(server_rank, 40)
    server = {"m.lora_A": a0, "m.lora_B": b0}
    b1, a1 = factors(server_rank, 41)
    b2, a2 = factors(server_rank, 42)
    # client 0 (p=0.25) updated components 0, 1; client 1 (p=0.75) updated component 0 only
    up0 = {"m.lora_A": a1[[0, 1]], "m.lora_B": b1[:, [0, 1]], "m" + INDEX_SUFFIX: torch.tensor([0, 1], dtype=torch.int32)}
    up1 = {"m.lora_A": a2[[0]], "m.lora_B": b2[:, [0]], "m" + INDEX_SUFFIX: torch.tensor([0], dtype=torch.int32)}
    return server | {"_a1": a1, "_a2": a2}, [ClientUpload(0, 1, up0), ClientUpload(1, 3, up1)]


def test_adaptive_aggregation_avoids_the_dilution_of_zero_padding() -> None:
    server, uploads = _hafl_uploads()
    a0, a1, a2 = server["m.lora_A"], server.pop("_a1"), server.pop("_a2")
    plan = RankPlan((3, 3), server_rank=3)
    adaptive = HAFL(plan, HAFLSettings(aggregation="adaptive")).aggregate(server, uploads)
    padded = HAFL(plan, HAFLSettings(aggregation="zero_padding")).aggregate(server, uploads)
    # component 1: only client 0 (p = 0.25) updated it
    torch.testing.assert_close(adaptive["m.lora_A"][1], a1[1])  # the updater's value, exactly
    torch.testing.assert_close(padded["m.lora_A"][1], 0.25 * a1[1])  # shrunk by p_0
    # component 0: both updated it -> the p-weighted mean in both schemes
    torch.testing.assert_close(adaptive["m.lora_A"][0], 0.25 * a1[0] + 0.75 * a2[0])
    torch.testing.assert_close(padded["m.lora_A"][0], 0.25 * a1[0] + 0.75 * a2[0])
    # component 2: nobody updated it -> adaptive keeps the old value, zero-padding erases it
    torch.testing.assert_close(adaptive["m.lora_A"][2], a0[2])
    assert float(padded["m.lora_A"][2].abs().max()) == 0.0


def test_hafl_freezing_keeps_frozen_components_bit_identical(cls_file: Path) -> None:
    overrides = tiny_overrides(cls_file, method="hafl", ranks="[2,2,4,4]", weight_decay=0.1, lr=0.05)
    fed = build_federation(load_config(None, overrides))
    sim = Simulator(fed)
    for round_num in (1, 2):  # round 2 selects by the importance learned in round 1
        for client in (0, 1):
            received = fed.method.download(sim.server, client)
            local = sim.local_state(client)
            start = fed.method.client_start(received, local, fed.initial_state(client), client)
            turn = client_turn(fed, client, round_num, received, local)
            trained = fed.binding.read()
            for key in [k for k in trained if k.endswith("lora_A")]:
                module = key[: -len(".lora_A")]
                chosen = start[CHOSEN + module].tolist()
                frozen = [i for i in range(4) if i not in chosen]
                assert len(chosen) == 2 and trained[key].shape[0] == 4
                assert torch.equal(trained[key][frozen], start[key][frozen])
                assert torch.equal(trained[module + ".lora_B"][:, frozen], start[module + ".lora_B"][:, frozen])
                assert not torch.equal(trained[key][chosen], start[key][chosen])
                assert turn.upload[module + INDEX_SUFFIX].tolist() == chosen
            sim.store.put(client, turn.local)


def test_hafl_truncation_sends_the_top_components_by_server_importance() -> None:
    plan = RankPlan((2, 4), server_rank=4)
    method = HAFL(plan, HAFLSettings(scheme="truncation"))
    b, a = factors(4, 50)
    server = method.server_init({"m.lora_A": a, "m.lora_B": b})
    assert method.download(server, 0)["m" + INDEX_SUFFIX].tolist() == [0, 1]  # nothing measured yet
    # the rank-4 client held every component and found 2 and 3 the most important
    upload = {
        "m.lora_A": a,
        "m.lora_B": b,
        "m" + INDEX_SUFFIX: torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        "m.hafl_score": torch.tensor([0.1, 0.2, 0.9, 0.5], dtype=torch.float64),
    }
    server = method.aggregate(server, [ClientUpload(1, 1, upload)])
    received = method.download(server, 0)
    assert received["m" + INDEX_SUFFIX].tolist() == [2, 3]
    assert torch.equal(received["m.lora_A"], server["m.lora_A"][[2, 3]])


# -- communication -------------------------------------------------------------------------------
def test_ffa_lora_uploads_half_of_fedit_when_square(cls_file: Path) -> None:
    """tiny-bert's query/value are 32 x 32 (d_in = d_out): A and B have equal sizes."""
    common = {"rounds": 1, "head": "frozen"}
    fedit, _ = run_tiny(tiny_overrides(cls_file, method="fedit", **common))
    ffa, _ = run_tiny(tiny_overrides(cls_file, method="ffa-lora", **common))
    for client, up in fedit.history[0]["bytes_up_per_client"].items():
        assert ffa.history[0]["bytes_up_per_client"][client] * 2 == up


def test_hafl_freezing_uploads_its_budget_share_plus_indices(cls_file: Path) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method="hafl", ranks="[2,2,4,4]", rounds=1, head="frozen"))
    full = num_bytes({k: v for k, v in sim.server.items() if not k.startswith("_")})  # rank-4 adapter
    modules = sum(1 for k in sim.server if k.endswith("lora_A"))
    for client, budget in enumerate([2, 2, 4, 4]):
        expected = full * budget // 4 + modules * budget * 4  # + int32 indices
        assert sim.history[0]["bytes_up_per_client"][client] == expected
        assert sim.history[0]["bytes_down_per_client"][client] == full


def test_product_norm_matches_the_dense_product() -> None:
    from fedtune.methods.hetlora import product_norm

    b, a = factors(5, 60)
    assert product_norm(b, a) == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-10)
