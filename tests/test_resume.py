"""`fedtune run --resume`: a run killed between rounds continues bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_classification_jsonl

from fedtune.cli import main
from fedtune.rundir import read_metrics

TIMING = ("seconds", "per_s")  # wall-clock fields differ between any two runs


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in rows]


def adapters(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("adapter_model.safetensors"))}


def run_args(data: Path, out: Path, **extra: object) -> list[str]:
    # fedsa-lora keeps B on each client: the resumed run needs its client states back
    settings = {"method": "fedsa-lora", "rounds": 5, "local_steps": 6, "fraction": 0.75, **extra}
    return ["run", *tiny_overrides(data, **settings), "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = write_classification_jsonl(root / "rows.jsonl")
    assert main(run_args(data, root / "whole")) == 0
    return data, root / "whole"


def test_sigkilled_run_resumes_bit_identical(uninterrupted: tuple[Path, Path], tmp_path: Path) -> None:
    data, whole = uninterrupted
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fedtune.cli", *run_args(data, out)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(read_metrics(out))
    assert 2 <= done < 5, f"the kill came too late to test anything ({done} rounds done)"
    assert not (out / "summary.json").exists()
    assert main(["run", "--resume", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the kill may land between a round's metrics row and its checkpoint: that round is redone
    assert summary["resumed_after_round"] in (done - 1, done) and summary["resumed_after_round"] >= 1
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))
    assert adapters(out) == adapters(whole) and len(adapters(whole)) == 1 + 4  # global + every client's


def test_resume_redoes_a_round_whose_checkpoint_was_not_committed(uninterrupted: tuple[Path, Path], tmp_path: Path) -> None:
    """Kill windows: a metrics row written but its checkpoint not yet renamed, and a torn
    last line. Both resume to the uninterrupted result."""
    data, whole = uninterrupted
    out = tmp_path / "window"
    assert main(run_args(data, out, rounds=2)) == 0
    rows = (out / "metrics.jsonl").read_text()
    with open(out / "metrics.jsonl", "a") as f:  # round 3 was written, its checkpoint never was
        f.write(json.dumps({**json.loads(rows.splitlines()[-1]), "round": 3, "accuracy": 0.123}) + "\n")
        f.write('{"round": 4, "accur')  # and a torn line
    (out / "summary.json").unlink()
    assert main(["run", "--resume", "--out", str(out), "rounds=5"]) == 0
    assert comparable(read_metrics(out)) == comparable(read_metrics(whole))
    assert adapters(out) == adapters(whole)
    assert "rounds: 5" in (out / "config.yaml").read_text()  # the accepted change is recorded


@pytest.mark.parametrize("change", ["seed=7", "lora.r=8", "method=fedit"])
def test_resume_refuses_a_changed_config(uninterrupted: tuple[Path, Path], change: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, whole = uninterrupted
    before = {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    assert main(["run", "--resume", "--out", str(whole), change]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "may change only rounds" in err, err
    assert {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()} == before


def test_resume_needs_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err
