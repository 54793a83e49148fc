"""The fedtune ServerApp: builds the server side of a run and drives the strategy's rounds.

In simulation (``fedtune flower simulate``) ``simulate.py`` calls :func:`run_server` with the
config object. In deployment (``flwr run``) the module-level ``app``
reads its settings from the Flower run config: ``fedtune-config`` (the YAML of a run
config, or a path to one), ``out-dir`` (the run directory, on the SuperLink's machine) and
``resume`` (continue from the last checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig, dump_config
from fedtune.plots import plot_run
from fedtune.rundir import RunDir
from fedtune.runtime.engine import build_federation, describe
from fedtune.runtime.evaluation import PRIMARY_METRIC
from fedtune.runtime.flower.strategy import FedtuneStrategy
from fedtune.runtime.server import FederatedServer
from fedtune.tracking import Trackers, check_backends

log = logging.getLogger("fedtune.flower.server")


def run_server(grid: Grid, config: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """One Flower run end to end on the server: rounds, checkpoints, run directory, exports."""
    check_backends(config.tracking)
    fed = build_federation(config, only_clients=set(), global_test=True)  # all checks before the run dir
    run_dir = RunDir.resume(out, config) if resume and out.is_dir() else RunDir.create(out, overwrite)
    trackers = Trackers.open(config, out, resumed=resume)
    try:
        return _run(grid, config, out, run_dir, fed, resume, trackers)
    except BaseException:
        trackers.close()
        run_dir.restore()  # failed before its first round: the replaced run comes back
        raise


def _run(grid: Grid, config: RunConfig, out: Path, run_dir: RunDir, fed: Any, resume: bool, trackers: Trackers) -> dict[str, Any]:
    server = FederatedServer(fed, checkpoint_dir=out / "checkpoint")
    start_round = 1
    history: list[dict[str, Any]] = []
    if resume:
        done = server.load_checkpoint()
        # rows after the checkpoint (a kill between the row and the checkpoint) are redone
        history = run_dir.keep_rounds(done)
        start_round = done + 1
        log.info("resuming after round %d", done)
    run_dir.write_config(dump_config(config))

    def global_eval() -> dict[str, float]:
        return fed.evaluate(fed.method.global_state(server.state, fed.initial_state(None)), fed.data.test, fed.data.scored_test)

    initial = fed.evaluate(fed.initial_state(None), fed.data.test, fed.data.scored_test) if config.eval_initial else None
    # no state or export dirs for the clients: each node writes only where its own config says
    strategy = FedtuneStrategy(server, global_eval=global_eval)
    cumulative = [sum(r["bytes_up"] for r in history), sum(r["bytes_down"] for r in history)]

    def on_round(row: dict[str, Any]) -> None:
        cumulative[0] += row["bytes_up"]
        cumulative[1] += row["bytes_down"]
        row["cumulative_bytes_up"], row["cumulative_bytes_down"] = cumulative
        history.append(row)
        run_dir.append_metrics(row)
        trackers.round(row)
        run_dir.commit()
        log.info("round %d: %s", row["round"], {k: v for k, v in row.items() if k in PRIMARY_METRIC.values()})

    strategy.run(grid, on_round, start_round)
    fed.save(fed.method.global_state(server.state, fed.initial_state(None)), out)
    strategy.export_personal(grid)
    primary = PRIMARY_METRIC[fed.data.task.metric]
    evaluated = [r for r in history if primary in r]
    better = min if primary == "loss" else max
    best = better(evaluated, key=lambda r: r[primary]) if evaluated else {}
    summary = {
        "method": fed.method.name,
        "runtime": "flower",
        "model": config.model,
        "dataset": config.dataset,
        "rounds": len(history),
        "clients": config.clients,
        "primary_metric": primary,
        "final": {k: v for k, v in (evaluated[-1] if evaluated else {}).items() if k in ("accuracy", "loss", "perplexity", "mc_accuracy", "exact_match") or k.startswith("personal_")},
        "best": {"round": best.get("round"), primary: best.get(primary)},
        "total_bytes_up": cumulative[0],
        "total_bytes_down": cumulative[1],
        "rejected_replies": sum(r.get("rejected_replies", 0) for r in history),
        "failed_replies": sum(r.get("failed_replies", 0) for r in history),
        "max_model_loads_per_process": max((r.get("model_loads", 0) for r in history), default=0),
        **describe(fed),
        **({"initial": initial} if initial else {}),
    }
    run_dir.write_summary(summary)
    plot_run(history, out / "plots", primary, title=f"{fed.method.name} (flower)")
    trackers.finish(summary)
    return summary


app = ServerApp()


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    raw = str(settings["fedtune-config"])
    data = yaml.safe_load(Path(raw).read_text()) if raw.endswith((".yaml", ".yml")) else yaml.safe_load(raw)
    config = RunConfig.model_validate(data)
    run_server(grid, config, Path(str(settings["out-dir"])), bool(settings.get("resume", False)), bool(settings.get("overwrite", False)))
