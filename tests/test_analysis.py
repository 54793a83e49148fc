"""`fedtune analyze`: subspace similarity and change on hand-made matrices, then on tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_classification_jsonl
from helpers import run_tiny
from safetensors.torch import save_file

from fedtune.analysis import (
    a_similarity,
    b_similarity,
    basis_similarity,
    column_change,
    delta_w_basis,
    delta_w_change,
    subspace_basis,
    subspace_similarity,
)
from fedtune.analysis.runs import adapter_key_to_canonical, lora_scale
from fedtune.cli import main

G = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(n, n))
    return q


# -- φ ---------------------------------------------------------------------------------------
def test_phi_of_a_matrix_with_itself_is_one() -> None:
    a, b = randn(4, 32), randn(24, 4)
    assert a_similarity(a, a) == pytest.approx(1.0)
    assert b_similarity(b, b) == pytest.approx(1.0)
    assert subspace_similarity(b @ a, b @ a, "row") == pytest.approx(1.0)


def test_phi_ignores_a_change_of_basis_inside_the_subspace() -> None:
    """A's rows mixed by R (R·A) or B's columns mixed by R (B·R): same subspaces, φ = 1."""
    a, b, r = randn(4, 32), randn(24, 4), orthogonal(4)
    assert a_similarity(a, r @ a) == pytest.approx(1.0)
    assert b_similarity(b, b @ r) == pytest.approx(1.0)
    # the same ΔW from re-parametrised factors (B R)(Rᵀ A)
    for side in ("column", "row"):
        u, v = delta_w_basis(a, b, 2.0, side), delta_w_basis(r.T @ a, b @ r, 2.0, side)
        assert basis_similarity(u, v) == pytest.approx(1.0)


def test_phi_of_orthogonal_subspaces_is_zero_and_of_half_shared_is_half() -> None:
    q = orthogonal(16)
    assert a_similarity(q[:4], q[4:8]) == pytest.approx(0.0, abs=1e-12)  # rows of A: R^16
    assert b_similarity(q[:, :4], q[:, 4:8]) == pytest.approx(0.0, abs=1e-12)  # columns of B
    # span{e1, e2} vs span{e1, e3}: one of two directions shared -> ‖UᵀV‖² / 2 = 1 / 2
    eye = torch.eye(5, dtype=torch.float64)
    assert b_similarity(eye[:, [0, 1]], eye[:, [0, 2]] * 3.0) == pytest.approx(0.5)


def test_phi_is_symmetric_and_within_unit_interval() -> None:
    for _ in range(20):
        x, y = randn(12, 3), randn(12, 5)
        for i, j in ((None, None), (1, 2), (2, 4), (3, 3)):
            phi = b_similarity(x, y, i, j)
            assert 0.0 <= phi <= 1.0
            assert phi == pytest.approx(b_similarity(y, x, j, i))


def test_top_i_subspace_inside_a_larger_one_has_phi_one() -> None:
    b = randn(20, 6)
    top1 = subspace_basis(b, "column", 1)
    assert top1.shape == (20, 1)
    assert basis_similarity(top1, subspace_basis(b, "column")) == pytest.approx(1.0)
    assert b_similarity(b, b[:, :3], 2, None) < 1.0  # a generic 2-dim subspace is not inside 3 of 6 columns


def test_zero_matrix_gives_nan_and_rank_deficient_matrix_is_clipped_to_its_rank() -> None:
    b = randn(10, 4)
    zero = torch.zeros(10, 4)
    assert subspace_basis(zero).shape == (10, 0)
    assert math.isnan(b_similarity(zero, b))
    assert math.isnan(b_similarity(zero, zero))
    assert math.isnan(basis_similarity(delta_w_basis(randn(4, 8), zero, 2.0), subspace_basis(b)))
    # four copies of one column: rank 1; the three extra "singular vectors" would be arbitrary
    column = randn(10, 1)
    rank_one = column.repeat(1, 4).to(torch.float32)
    assert subspace_basis(rank_one).shape == (10, 1)
    assert b_similarity(rank_one, column) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        subspace_basis(b, "column", 0)


def test_delta_w_basis_from_factors_matches_the_svd_of_the_product() -> None:
    a, b, s = randn(4, 30), randn(20, 4), 0.5
    for side in ("column", "row"):
        from_factors = delta_w_basis(a, b, s, side)
        direct = subspace_basis(s * b @ a, side)
        assert from_factors.shape == direct.shape == ((20 if side == "column" else 30), 4)
        # same subspace: equal projectors
        assert torch.allclose(from_factors @ from_factors.T, direct @ direct.T, atol=1e-10)
    # with full-rank factors col(ΔW) = col(B): φ_dW (full rank) equals φ_B
    a2, b2 = randn(4, 30), randn(20, 4)
    assert basis_similarity(delta_w_basis(a, b), delta_w_basis(a2, b2)) == pytest.approx(b_similarity(b, b2))


# -- magnitude / direction -------------------------------------------------------------------
def test_change_of_unchanged_weights_is_zero() -> None:
    w = randn(6, 9)
    change = column_change(w, w.clone())
    assert change.magnitude == pytest.approx(0.0, abs=1e-12)
    assert change.direction == pytest.approx(0.0, abs=1e-12)
    assert (change.direction_columns, change.columns) == (9, 9)
    a, b = randn(4, 9), randn(6, 4)
    dw = delta_w_change(a, b, 2.0, a, b, 2.0)
    assert dw.magnitude == pytest.approx(0.0, abs=1e-12)
    assert dw.direction == pytest.approx(0.0, abs=1e-12)


def test_change_matches_a_hand_computed_2x2_example() -> None:
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    wt = torch.tensor([[3.0, 1.0], [4.0, 1.0]])
    # column 0: (1,0) -> (3,4): |5 - 1| = 4, 1 - cos = 1 - 3/5 = 0.4
    # column 1: (0,1) -> (1,1): |√2 - 1|,    1 - cos = 1 - 1/√2
    change = column_change(wt, w0)
    assert change.magnitude == pytest.approx((4 + math.sqrt(2) - 1) / 2)
    assert change.direction == pytest.approx((0.4 + 1 - 1 / math.sqrt(2)) / 2)


def test_zero_initial_columns_are_left_out_of_direction_and_counted() -> None:
    w0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    wt = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    change = column_change(wt, w0)
    assert change.magnitude == pytest.approx((0 + 2) / 2)
    assert change.direction == pytest.approx(1.0)  # only column 0: orthogonal, 1 - 0
    assert (change.direction_columns, change.columns) == (1, 2)
    b_init = column_change(randn(6, 4), torch.zeros(6, 4))  # B from its zero init
    assert math.isnan(b_init.direction) and b_init.direction_columns == 0


def test_delta_w_change_from_factors_matches_the_explicit_product() -> None:
    a_t, b_t, a_0, b_0 = randn(4, 9), randn(6, 4), randn(4, 9), randn(6, 4)
    expected = column_change(2.0 * b_t @ a_t, 0.5 * b_0 @ a_0)
    got = delta_w_change(a_t, b_t, 2.0, a_0, b_0, 0.5)
    assert got.magnitude == pytest.approx(expected.magnitude)
    assert got.direction == pytest.approx(expected.direction)
    from_zero = delta_w_change(a_t, b_t, 2.0, a_0, torch.zeros(6, 4), 2.0)
    assert math.isnan(from_zero.direction)
    assert from_zero.magnitude == pytest.approx(float((2.0 * b_t @ a_t).norm(dim=0).mean()))


# -- reading adapters ------------------------------------------------------------------------
def test_adapter_keys_and_scale() -> None:
    base = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert adapter_key_to_canonical(f"{base}.lora_A.weight") == "bert.encoder.layer.0.attention.self.query.lora_A"
    assert adapter_key_to_canonical(f"{base}.lora_B.default.weight") == "bert.encoder.layer.0.attention.self.query.lora_B"
    assert adapter_key_to_canonical("base_model.model.classifier.weight") is None
    assert lora_scale("x.query", 8, {"lora_alpha": 16}) == 2.0
    assert lora_scale("x.query", 16, {"lora_alpha": 16, "use_rslora": True}) == 4.0
    assert lora_scale("x.query", 8, {"lora_alpha": 16, "alpha_pattern": {"query": 32}}) == 4.0


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny local-only runs: every client from its own LoRA init, and all from one."""
    root = tmp_path_factory.mktemp("analysis")
    data = write_classification_jsonl(root / "cls.jsonl")
    runs = {}
    for mode in ("per_client", "shared"):
        runs[mode] = root / mode
        run_tiny(tiny_overrides(data, method="local-only", **{"lora.init_seed_mode": mode}), runs[mode])
    return runs


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_analyze_a_local_only_run(local_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    summaries = {}
    for mode, run in local_runs.items():
        assert main(["analyze", str(run)]) == 0
        out = run / "analysis"
        for name in ("similarity.csv", "similarity_mean.csv", "change.csv", "change_mean.csv", "summary.json", "change.png"):
            assert (out / name).is_file(), name
        for matrix in ("A", "B", "dW"):
            assert (out / f"similarity_{matrix}.png").stat().st_size > 0
        summaries[mode] = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "mean φ" in printed and "client pairs (6)" in printed

    summary = summaries["per_client"]
    assert summary["clients"] == 4 and summary["modules"] == 4
    assert summary["similarity"]["clients"]["pairs"] == 6
    rows = _rows(local_runs["per_client"] / "analysis" / "similarity.csv")
    # 6 client pairs + 5 adapters (global + 4) vs their init, x 4 modules x 3 matrices
    assert len(rows) == (6 + 5) * 4 * 3
    for row in rows:
        phi = float(row["phi"])
        assert math.isnan(phi) or 0.0 <= phi <= 1.0
    # B starts at 0: its φ against the init and its direction change are undefined, not 0
    assert summary["similarity"]["initial"]["clients"]["B"] is None
    assert summary["change"]["clients"]["B"]["direction"] is None
    assert summary["change"]["clients"]["B"]["magnitude"] > 0
    # each client is compared with its *own* init: a few local steps keep A close to it
    assert summary["similarity"]["initial"]["clients"]["A"] > 0.8
    # local-only's global adapter never trains: it is its initial state
    assert summary["change"]["global"]["A"]["magnitude"] == pytest.approx(0.0, abs=1e-7)

    # seed 000's finding in miniature: A's similarity across clients comes from a shared init
    # (random 4-dim subspaces of R^32 give φ ≈ 4/32; a shared init stays near 1)
    shared_a = summaries["shared"]["similarity"]["clients"]["A"]
    own_a = summary["similarity"]["clients"]["A"]
    assert own_a < 0.3 < 0.8 < shared_a


def test_analyze_against_another_run(local_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "against"
    code = main(["analyze", str(local_runs["per_client"]), "--against", str(local_runs["shared"]), "--out", str(out)])
    assert code == 0
    against = [r for r in _rows(out / "similarity.csv") if r["kind"] == "against"]
    assert len(against) == (1 + 4 * 4) * 4 * 3  # global vs global, then every client pair
    assert all(math.isnan(float(r["phi"])) or 0.0 <= float(r["phi"]) <= 1.0 for r in against)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["against"] == str(local_runs["shared"])
    assert summary["similarity"]["against"]["clients"]["pairs"] == 16
    # local-only's global adapter is the run's shared init, drawn from the run seed (0 in both)
    assert summary["similarity"]["against"]["global"]["A"] == pytest.approx(1.0)
    # the per-client run's clients started elsewhere than the shared run's: low A similarity
    assert summary["similarity"]["against"]["clients"]["A"] < 0.3
    assert (out / "against_A.png").is_file() and (out / "against_B.png").is_file()


def _fake_run(path: Path, modules: list[str], with_model_dir: bool = False) -> Path:
    """A minimal run directory written by hand (for error paths)."""
    adapter = path / "adapter"
    adapter.mkdir(parents=True)
    state = {}
    for module in modules:
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, 6)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(6, 2)
    save_file(state, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    initial = {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in state.items()}
    (path / "initial").mkdir()
    save_file(initial, str(path / "initial" / "global.safetensors"))
    return path


def test_fake_run_analyzes_and_other_modules_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = _fake_run(tmp_path / "one", ["m.q", "m.v"])
    two = _fake_run(tmp_path / "two", ["m.q", "m.k"])
    assert main(["analyze", str(one)]) == 0
    summary = json.loads((one / "analysis" / "summary.json").read_text())
    assert "clients" not in summary["similarity"]  # no personal adapters: nothing to pair
    assert summary["similarity"]["initial"]["global"]["A"] == pytest.approx(1.0)
    capsys.readouterr()
    assert main(["analyze", str(one), "--against", str(two)]) == 2
    assert "different LoRA modules" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full_weight = tmp_path / "full"
    (full_weight / "model").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "missing": ([str(tmp_path / "nope")], "not found"),
        "full-weight run": ([str(full_weight)], "no LoRA adapters"),
        "no adapter": ([str(empty)], "no adapter/"),
        "bad top-i": ([str(_fake_run(tmp_path / "ok", ["m.q"])), "--top-i", "0"], "--top-i"),
        "missing against": ([str(tmp_path / "ok"), "--against", str(empty)], "no adapter/"),
    }
    for case, (args, expected) in cases.items():
        code = main(["analyze", *args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, case
        assert len(lines) == 1 and expected in lines[0], (case, err)
