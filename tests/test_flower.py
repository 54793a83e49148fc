"""The distributed runtime on Flower's simulation engine (Ray), tiny models.

One simulation-engine start serves every run of this module (``simulate_many``): Ray's
start-up is the slow part on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import METHOD_CASES, tiny_overrides, write_classification_jsonl, write_image_folder
from helpers import run_tiny
from safetensors import safe_open
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.rundir import read_metrics
from fedtune.state import is_bookkeeping, max_abs_diff

pytestmark = pytest.mark.slow

CASES = METHOD_CASES
FAULTS = {
    "method": "fedit",
    "rounds": 3,
    "max_update_norm": 1000.0,
    "flower.inject_faults": "[crash:0,nan:1,wrong_shape:2,huge:3]",
}
#: one honest client and three malicious ClientApps: one claims another client's id, one an
#: id nobody has, one sends array bytes no parser accepts
MALICIOUS = {
    "method": "fedit",
    "fraction": 1.0,
    "flower.inject_faults": "[impersonate:1,unknown_id:2,garbage_array:3]",
    "tracking": "[tensorboard]",  # the Flower server logs to the trackers as the simulator does
}
FLOWER = {"flower.client_cpus": 2, "fraction": 0.75}
#: an image job: a tiny ViT on an image folder
IMAGE = {"method": "fedit", "model": "tiny-vit", "batch_size": 8, "eval_initial": True}


def overrides_for(dataset: Path, extra: dict[str, object]) -> list[str]:
    return tiny_overrides(dataset, **{"rounds": 2, **FLOWER, **extra})


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedtune.runtime.flower.simulate import simulate_many

    root = tmp_path_factory.mktemp("flower")
    dataset = write_classification_jsonl(root / "cls.jsonl")
    runs = {name: (load_config(None, overrides_for(dataset, extra)), root / name) for name, extra in CASES.items()}
    runs["faults"] = (load_config(None, overrides_for(dataset, FAULTS)), root / "faults")
    runs["malicious"] = (load_config(None, overrides_for(dataset, MALICIOUS)), root / "malicious")
    images = write_image_folder(root / "images")
    runs["image"] = (load_config(None, overrides_for(images, IMAGE)), root / "image")
    simulate_many(list(runs.values()))
    return {"dataset": dataset, "images": images, **{name: out for name, (_, out) in runs.items()}}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_flower_simulation_aggregates_what_the_simulator_aggregates(flower_runs: dict[str, Path], name: str) -> None:
    simulator, _ = run_tiny(overrides_for(flower_runs["dataset"], CASES[name]))
    flower_state = load_file(str(flower_runs[name] / "checkpoint" / "server.safetensors"))
    ours = {k: v for k, v in simulator.server.items() if not is_bookkeeping(k)}
    theirs = {k: v for k, v in flower_state.items() if not is_bookkeeping(k)}
    assert max_abs_diff(ours, theirs) <= 1e-6
    flower_rows, sim_rows = read_metrics(flower_runs[name]), simulator.history
    assert all(r["rejected_replies"] == 0 and r["failed_replies"] == 0 for r in flower_rows)
    assert [r["clients"] for r in flower_rows] == [r["clients"] for r in sim_rows]
    assert [r["bytes_up"] for r in flower_rows] == [r["bytes_up"] for r in sim_rows]
    assert [r["bytes_down"] for r in flower_rows] == [r["bytes_down"] for r in sim_rows]
    if simulator.method.export_format == "adapter":
        assert (flower_runs[name] / "adapter" / "adapter_model.safetensors").exists()


def test_model_loaded_once_per_process_not_per_round(flower_runs: dict[str, Path]) -> None:
    rows = read_metrics(flower_runs["fedit"])
    assert [r["model_loads"] for r in rows] == [1, 1]
    summary = json.loads((flower_runs["fedit"] / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["max_model_loads_per_process"] == 1


def test_local_parts_stay_on_clients_and_personal_adapters_are_written(flower_runs: dict[str, Path]) -> None:
    out = flower_runs["fed-alora-keep"]
    rows = read_metrics(out)
    assert all("personal_accuracy" in r for r in rows)
    for client in range(4):
        assert (out / "clients" / str(client) / "adapter" / "adapter_model.safetensors").exists()
        saved = sorted((out / "client_state" / f"client-{client}").glob("round-*.safetensors"))
        assert saved and all(k.endswith("lora_A") for k in load_file(str(saved[-1])))
    server = load_file(str(out / "checkpoint" / "server.safetensors"))
    assert not [k for k in server if k.endswith("lora_A")], "Fed-ALoRA's A never reaches the server"


def test_crashed_and_malformed_replies_are_dropped_and_the_run_completes(flower_runs: dict[str, Path]) -> None:
    out = flower_runs["faults"]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        sampled = set(row["clients"])
        assert row["failed_replies"] == int(0 in sampled)  # client 0 crashes
        assert row["rejected_replies"] == len(sampled & {1, 2, 3})  # NaN, wrong shape, huge norm
        reasons = row["rejected"]
        if "1" in reasons:
            assert "non-finite" in reasons["1"]
        if "2" in reasons:
            assert "shape" in reasons["2"]
        if "3" in reasons:
            assert "exceeds the bound" in reasons["3"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_replies"] + summary["rejected_replies"] > 0
    state = load_file(str(out / "checkpoint" / "server.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_an_image_job_on_flower_aggregates_what_the_simulator_aggregates(flower_runs: dict[str, Path]) -> None:
    simulator, summary = run_tiny(overrides_for(flower_runs["images"], IMAGE))
    flower_state = load_file(str(flower_runs["image"] / "checkpoint" / "server.safetensors"))
    ours = {k: v for k, v in simulator.server.items() if not is_bookkeeping(k)}
    assert max_abs_diff(ours, {k: flower_state[k] for k in ours}) <= 1e-6
    assert [r["accuracy"] for r in read_metrics(flower_runs["image"])] == [r["accuracy"] for r in simulator.history]
    # eval_initial: the Flower server scores the starting model as the simulator does
    flower_initial = json.loads((flower_runs["image"] / "summary.json").read_text())["initial"]
    assert flower_initial["accuracy"] == summary["initial"]["accuracy"]
    assert flower_initial["loss"] == pytest.approx(summary["initial"]["loss"], abs=1e-6)


def test_malicious_clientapps_are_rejected_and_the_run_completes(flower_runs: dict[str, Path]) -> None:
    out = flower_runs["malicious"]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["aggregated"] and row["rejected_replies"] == 3 and row["failed_replies"] == 0
        reasons = list(row["rejected"].values())
        assert sum("replied as client 2," in r for r in reasons) == 1, reasons  # client 1's node posing as 2
        assert sum("replied as client 103," in r for r in reasons) == 1, reasons  # an id nobody has
        assert sum("unreadable array data" in r for r in reasons) == 1, reasons  # client 3's bytes
        assert list(row["bytes_up_per_client"]) == ["0"]  # the round is the honest client's alone
    state = load_file(str(out / "checkpoint" / "server.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert json.loads((out / "summary.json").read_text())["rejected_replies"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("rejected_replies")] == [(1, 3.0), (2, 3.0)]


def _completed_round(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with safe_open(str(checkpoint), "pt") as f:
            return int((f.metadata() or {}).get("completed_round", 0))
    except Exception:  # being replaced right now
        return 0


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    dataset = write_classification_jsonl(tmp_path / "cls.jsonl", rows=400)
    extra = {"method": "fed-alora", "fed_alora.a_persistence": "keep", "rounds": 6, "local_steps": 15, "batch_size": 8}
    overrides = tiny_overrides(dataset, **{**FLOWER, **extra})
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fedtune.cli", "flower", "simulate", *overrides, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint" / "server.safetensors"
    deadline = time.time() + 420
    try:
        while _completed_round(checkpoint) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint of round 2 in time"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    stopped_at = _completed_round(checkpoint)
    assert 2 <= stopped_at < 6
    # a changed config is refused before anything starts, and leaves the run as it was
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = subprocess.run([*command[:-2], "seed=7", *command[-2:], "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "seed differs" in changed.stderr, changed.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # both kill windows: a row written whose checkpoint never was, and a torn last line
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": stopped_at + 1, "accuracy": -1.0}) + "\n" + '{"round": 9, "acc')
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r.get("accuracy") != -1.0 for r in rows)  # the uncommitted round was redone

    uninterrupted, _ = run_tiny(overrides)
    final = load_file(str(checkpoint))
    ours = {k: v for k, v in uninterrupted.server.items() if not is_bookkeeping(k)}
    assert max_abs_diff(ours, {k: final[k] for k in ours}) <= 1e-6
    # the personal parts resumed too: each client's adapter equals the uninterrupted one
    for client in range(4):
        saved = load_file(str(out / "clients" / str(client) / "adapter" / "adapter_model.safetensors"))
        personal = uninterrupted.method.export_state(uninterrupted.personal_state(client))
        for key, value in personal.items():
            peft_key = "base_model.model." + key + (".weight" if key.endswith(("lora_A", "lora_B")) else "")
            assert torch.allclose(saved[peft_key], value, atol=1e-6)
