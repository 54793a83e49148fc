"""The embedded runtime on tiny random-init models: state movement, determinism, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_tiny

from fedtune.config import load_config
from fedtune.runtime.engine import build_federation, client_turn
from fedtune.runtime.simulator import Simulator
from fedtune.state import max_abs_diff


def test_ffa_lora_a_is_identical_on_all_clients_and_never_changes(cls_file: Path) -> None:
    fed = build_federation(load_config(None, tiny_overrides(cls_file, method="ffa-lora")))
    sim = Simulator(fed)
    a_keys = [k for k in fed.binding.keys if k.endswith("lora_A")]
    initial_a = {k: fed.initial_state(0)[k] for k in a_keys}
    for client_id in range(fed.config.clients):
        assert max_abs_diff({k: fed.initial_state(client_id)[k] for k in a_keys}, initial_a) == 0.0
        received = fed.method.download(sim.server, client_id)
        assert not [k for k in received if k.endswith("lora_A")]
        turn = client_turn(fed, client_id, 1, received, {})
        assert turn.result.loss > 0
        assert not [k for k in turn.upload if k.endswith("lora_A")]
        after = fed.binding.read(a_keys)
        assert all(torch.equal(after[k], initial_a[k]) for k in a_keys), "frozen A moved during local training"
        b_moved = any(
            not torch.equal(fed.binding.read([k])[k], fed.initial_state(0)[k]) for k in fed.binding.keys if k.endswith("lora_B")
        )
        assert b_moved, "B should train"


def test_same_seed_reproduces_metrics_and_other_seed_differs(cls_file: Path) -> None:
    _, first = run_tiny(tiny_overrides(cls_file, method="fedit", seed=3))
    sim_second, second = run_tiny(tiny_overrides(cls_file, method="fedit", seed=3))
    sim_other, other = run_tiny(tiny_overrides(cls_file, method="fedit", seed=4))
    assert first["final"] == second["final"]
    assert first["final_train_loss"] == second["final_train_loss"]
    assert first["final_train_loss"] != other["final_train_loss"]
    assert max_abs_diff(sim_second.server, sim_other.server) > 0


def test_run_directory_contents(cls_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _, summary = run_tiny(tiny_overrides(cls_file, method="fed-alora", rounds=3), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("method", "train_loss", "accuracy", "personal_accuracy", "bytes_up", "bytes_down", "seconds"):
            assert key in row, key
        assert row["bytes_up"] == sum(row["bytes_up_per_client"].values())
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3 == summary["rounds"]
    assert "method: fed-alora" in (out / "config.yaml").read_text()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "initial" / "global.safetensors").exists()
    for client in range(4):
        assert (out / "clients" / str(client) / "adapter" / "adapter_model.safetensors").exists()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"accuracy_vs_round.png", "train_loss_vs_round.png", "accuracy_vs_uplink_bytes.png"} <= plots
    assert not (out / "client_state").exists()


def test_training_tokens_are_counted_per_round_and_in_the_summary(cls_file: Path) -> None:
    sim, summary = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=2, local_steps=3, batch_size=4))
    fed = sim.fed
    per_round = [r["train_tokens"] for r in sim.history]
    # every sampled client trains local_steps batches; tokens are the non-padding positions of those batches
    assert all(t >= 4 * 3 * len(sim.server_side.sampled(i + 1)) for i, t in enumerate(per_round))
    assert all(t <= 4 * 3 * fed.config.max_seq_len * fed.config.clients for t in per_round)
    assert summary["train_tokens"] == sum(per_round)
    compute = sum(r["compute_seconds"] for r in sim.history)
    assert summary["train_tokens_per_second"] == pytest.approx(summary["train_tokens"] / compute)
    assert "gpu_peak_memory_bytes" not in summary  # a CPU run has no GPU memory to report


def test_methods_without_local_parts_have_no_personal_eval(cls_file: Path, tmp_path: Path) -> None:
    _, summary = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=1), tmp_path / "r")
    assert "accuracy" in summary["final"]
    assert not [k for k in summary["final"] if k.startswith("personal_")]
    assert not (tmp_path / "r" / "clients").exists()


def test_bytes_follow_what_is_shared(cls_file: Path) -> None:
    """FedIT sends A and B (+head); FFA-LoRA sends B (+head): the difference is exactly A."""
    sims = {m: run_tiny(tiny_overrides(cls_file, method=m, rounds=1, head="frozen"))[0] for m in ("fedit", "ffa-lora")}
    fed = sims["fedit"].fed
    a_bytes = sum(v.numel() * 4 for k, v in fed.initial_state().items() if k.endswith("lora_A"))
    per_client = {m: s.history[0]["bytes_up_per_client"] for m, s in sims.items()}
    for client in per_client["fedit"]:
        assert per_client["fedit"][client] - per_client["ffa-lora"][client] == a_bytes


def test_wire_dtype_halves_bytes_and_rounds_values(cls_file: Path) -> None:
    fp32, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=1))
    bf16, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=1, wire_dtype="bfloat16"))
    assert bf16.history[0]["bytes_up"] * 2 == fp32.history[0]["bytes_up"]
    # uploads were rounded to bf16 on the wire: the aggregate moves, but only by rounding
    assert 0 < max_abs_diff(fp32.server, bf16.server) < 5e-2


def test_client_sampling_fraction(cls_file: Path) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method="fedit", rounds=3, fraction=0.5))
    for row in sim.history:
        assert len(row["clients"]) == 2
    assert len({tuple(r["clients"]) for r in sim.history}) > 1 or sim.history[0]["clients"] != [0, 1]


def test_full_weight_run_exports_model(cls_file: Path, tmp_path: Path) -> None:
    sim, summary = run_tiny(tiny_overrides(cls_file, method="fedavg-full", rounds=1), tmp_path / "full")
    assert (tmp_path / "full" / "model" / "config.json").exists()
    assert summary["shared_params"] == summary["trainable_params"]
    changed = [k for k, v in sim.server.items() if not torch.equal(v, sim.fed.initial_state()[k])]
    assert changed, "full-weight training should move the target weights"


@pytest.mark.parametrize("method", ["fedsa-lora", "fed-alora"])
def test_local_parts_persist_in_store_and_differ_between_clients(cls_file: Path, method: str) -> None:
    sim, _ = run_tiny(tiny_overrides(cls_file, method=method, rounds=1, **{"fed_alora.a_persistence": "keep"}))
    states = [sim.store.get(c) for c in range(4)]
    assert all(s for s in states)
    assert max_abs_diff(states[0], states[1]) > 0


@pytest.mark.slow
def test_a_thousand_clients_fit_with_state_spilled_to_disk(tmp_path: Path) -> None:
    from conftest import write_classification_jsonl

    dataset = write_classification_jsonl(tmp_path / "many.jsonl", rows=2400)
    overrides = tiny_overrides(
        dataset, method="fed-alora", clients=1000, rounds=1, local_steps=1, batch_size=2, local_test_fraction=0.0,
        store_memory_mb=0.1, max_eval_examples=32, **{"fed_alora.a_persistence": "keep"},
    )  # fmt: skip
    sim, summary = run_tiny(overrides, tmp_path / "run")
    assert summary["clients"] == 1000 and len(sim.history[0]["clients"]) == 1000
    assert len(sim.store) == 1000
    assert sim.store.memory_bytes <= 0.1 * 2**20
    assert len(sim.store.spilled) > 900
    for client in (0, 999):
        assert (tmp_path / "run" / "clients" / str(client) / "adapter" / "adapter_model.safetensors").exists()


def test_eval_initial_scores_the_untrained_starting_model(cls_file: Path) -> None:
    """``eval_initial``: the model every client starts from, scored here by hand in plain torch."""
    overrides = tiny_overrides(cls_file, method="fedit", eval_initial=True)
    _, summary = run_tiny(overrides)
    fed = build_federation(load_config(None, overrides))
    fed.binding.load(fed.initial_state())
    model = fed.binding.model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for example in fed.data.test:
            logits = model(input_ids=example.input_ids[None], attention_mask=torch.ones_like(example.input_ids)[None]).logits[0]
            losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([example.labels]))))
            correct += int(int(logits.argmax()) == example.labels)
    assert summary["initial"]["accuracy"] == correct / len(fed.data.test)
    assert summary["initial"]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert summary["initial"] != summary["final"] and "initial" not in run_tiny(tiny_overrides(cls_file, method="fedit"))[1]
