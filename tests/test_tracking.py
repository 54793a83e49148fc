"""tracking=[tensorboard, mlflow, wandb]: each backend's own reader sees the run's config,
every round's metrics and the summary, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedtune.cli import main
from fedtune.rundir import read_metrics


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_classification_jsonl

    root = tmp_path_factory.mktemp("tracking")
    data = write_classification_jsonl(root / "rows.jsonl")
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        args = ["run", *tiny_overrides(data, method="fedit", rounds=3, tracking="[tensorboard,mlflow,wandb]"), "--out", str(out)]
        assert main(args) == 0
    return out


def test_tensorboard_event_files_hold_every_round(tracked: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    rows = read_metrics(tracked)
    accuracy = events.Scalars("accuracy")
    assert [e.step for e in accuracy] == [r["round"] for r in rows] == [1, 2, 3]
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in rows])
    assert [e.value for e in events.Scalars("bytes_up")] == [r["bytes_up"] for r in rows]
    assert {"config", "summary"} <= {tag.split("/")[0] for tag in events.Tags()["tensors"]}


def test_mlflow_store_holds_params_metrics_and_the_run_directory(tracked: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked / 'mlflow' / 'mlflow.db'}")
    run = client.get_run((tracked / "mlflow" / "run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "fedit" and run.data.params["rounds"] == "3"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    rows = read_metrics(tracked)
    assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter"} <= artifacts
    assert "mlflow" not in artifacts  # the store is not copied into itself
    summary = json.loads((tracked / "summary.json").read_text())
    assert float(run.data.tags["summary.final.accuracy"]) == pytest.approx(summary["final"]["accuracy"])


def wandb_records(path: Path) -> list:
    """The records of a W&B run file, read with W&B's own protobuf schema. The file is a
    LevelDB-style log (W&B's Python reader moved into its Go core): a 7-byte header, 32 KiB
    blocks, each chunk a 7-byte header (crc32, length, kind: full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_wandb_offline_run_holds_config_rounds_summary_and_artifact(tracked: Path) -> None:
    [run_file] = list((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(run_file)

    def items(update) -> dict[str, object]:
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}

    kinds = [r.WhichOneof("record_type") for r in records]
    [run] = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert items(run.config.update)["method"] == "fedit"
    history = [items(r.history.item) for r, k in zip(records, kinds) if k == "history"]
    rows = read_metrics(tracked)
    assert [(h["round"], h["accuracy"]) for h in history] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    summary = {}
    for r, k in zip(records, kinds):
        if k == "summary":
            summary.update(items(r.summary.update))
    assert summary["final/accuracy"] == pytest.approx(json.loads((tracked / "summary.json").read_text())["final"]["accuracy"])
    assert [r.artifact.type for r, k in zip(records, kinds) if k == "artifact"] == ["fedtune-run"]


def test_a_missing_backend_is_one_line_and_writes_nothing(cls_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(cls_file, tracking="[mlflow]"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'fedtune[mlflow]'" in err
    assert not out.exists()
