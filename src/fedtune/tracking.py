"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, any subset (``tracking=[...]``).

Each backend receives the resolved config once, every round's scalar metrics (step = round)
and the final summary, and keeps the run directory as its artifact. The simulator and the
Flower server call the same three methods, so both runtimes log alike. Where each writes:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``);
- ``mlflow``: ``tracking_uri`` if set, else ``MLFLOW_TRACKING_URI``, else a SQLite store in
  ``RUN_DIR/mlflow`` (MLflow 3 keeps its file store in maintenance mode); the run directory
  (less that store) is logged as the run's artifacts when the run ends;
- ``wandb``: project ``tracking_project``; online when ``WANDB_API_KEY`` is set or
  ``WANDB_MODE`` says so, else offline files in ``RUN_DIR/wandb`` (``wandb sync`` uploads them).

A resumed run continues the same MLflow / W&B run (its id is kept in the run directory).
The libraries are optional extras (``pip install fedtune[tensorboard]`` ...); a missing one is
a one-line error before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedtune.errors import UsageError

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name: module to import
#: what each backend writes inside the run directory (not logged back as artifacts)
OWN_DIRS = ("tensorboard", "mlflow", "wandb")


def check_backends(names: Sequence[str]) -> None:
    """Refuse a backend whose library is not installed (one line, nothing written yet)."""
    for name in names:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise UsageError(f"tracking={name} needs the {BACKENDS[name]} package: pip install 'fedtune[{name}]'")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row or summary, nested ones as ``outer/inner``."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, bool) or key == "round":
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, Mapping):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
    return out


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return params


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resumed:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```", 0)

    def round(self, row: Mapping[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, int(row["round"]))
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2, default=str) + "\n```", int(summary.get("rounds", 0)))
        self.close()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed: bool, uri: str | None, project: str) -> None:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # table creation notes on every new store
        logging.getLogger("alembic").setLevel(logging.WARNING)
        store = run_dir / "mlflow"
        store.mkdir(exist_ok=True)
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        local = uri is None  # then the store and its artifacts live in the run directory
        uri = uri or f"sqlite:///{(store / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient(uri)
        id_file = store / "run_id"
        if resumed and id_file.exists():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = self.client.get_experiment_by_name(project)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = (store / "artifacts").resolve().as_uri() if local else None
                experiment_id = self.client.create_experiment(project, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id)
            for key, value in flat_params(config).items():
                self.client.log_param(self.run_id, key, value[:6000])

    def round(self, row: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", "."), value, now, int(row["round"])) for key, value in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        for key, value in scalars(summary).items():
            self.client.set_tag(self.run_id, f"summary.{key.replace('/', '.')}", str(value))
        for item in sorted(run_dir.iterdir()):
            if item.name in OWN_DIRS:
                continue
            if item.is_dir():
                self.client.log_artifacts(self.run_id, str(item), artifact_path=item.name)
            else:
                self.client.log_artifact(self.run_id, str(item))
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


class _Wandb:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed: bool, project: str) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints would drown fedtune's lines
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(exist_ok=True)
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
            config=dict(config), settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip

    def round(self, row: Mapping[str, Any]) -> None:
        self.run.log({**scalars(row), "round": int(row["round"])}, step=int(row["round"]))

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        import wandb

        self.run.summary.update(scalars(summary))
        artifact = wandb.Artifact(f"run-{self.run.id}", type="fedtune-run")
        for item in sorted(run_dir.iterdir()):
            if item.name in OWN_DIRS:
                continue
            if item.is_dir():
                artifact.add_dir(str(item), name=item.name)
            else:
                artifact.add_file(str(item))
        self.run.log_artifact(artifact)
        self.run.finish()

    def close(self) -> None:
        self.run.finish(exit_code=1)


class Trackers:
    """The backends a run asked for, called together; none is a no-op."""

    def __init__(self, backends: list[Any], run_dir: Path | None) -> None:
        self.backends, self.run_dir, self.done = backends, run_dir, False

    @classmethod
    def open(cls, config: Any, run_dir: Path | None, resumed: bool = False) -> Trackers:
        names = list(config.tracking)
        if not names or run_dir is None:
            return cls([], run_dir)
        check_backends(names)
        dumped = config.model_dump(mode="json")
        backends: list[Any] = []
        for name in names:
            if name == "tensorboard":
                backends.append(_TensorBoard(run_dir, dumped, resumed))
            elif name == "mlflow":
                backends.append(_MLflow(run_dir, dumped, resumed, config.tracking_uri, config.tracking_project))
            else:
                backends.append(_Wandb(run_dir, dumped, resumed, config.tracking_project))
        return cls(backends, run_dir)

    def round(self, row: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.round(row)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.finish(summary, self.run_dir)
        self.done = True

    def close(self) -> None:
        """After a failure: end every backend's run as failed (nothing more is logged)."""
        if self.done:
            return
        for backend in self.backends:
            try:
                backend.close()
            except Exception:  # a tracker must not hide the error that ended the run
                pass
        self.done = True
