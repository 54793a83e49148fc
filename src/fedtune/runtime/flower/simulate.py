"""``fedtune flower simulate``: a run on Flower's simulation engine (Ray backend), offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig

#: Flower phones home for updates and telemetry and, on a SuperLink, installs app
#: dependencies at run time; all need the network and fail silently offline.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def backend_config(config: RunConfig) -> dict[str, Any]:
    settings = config.flower
    return {
        "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus},
        "init_args": {"num_cpus": settings.ray_cpus or os.cpu_count() or 1, "include_dashboard": False},
    }


def simulation_client_app(runs: list[tuple[RunConfig, Path]]) -> Any:
    """fedtune's ClientApp, each simulated node configured as a data holder would configure it.

    Flower's simulation engine gives a node no config beyond its partition id, and the
    ClientApp writes only under its node config's ``state-dir`` / ``export-dir``, never where
    a message says. So the operator of the simulation (who is every data holder here) sets
    them: for a message of run ``config``, ``OUT/client_state`` and ``OUT/clients``. A
    message for a config that is none of ``runs`` gets no dirs, so nothing is written.
    """
    from dataclasses import replace

    from flwr.app import ConfigRecord
    from flwr.clientapp import ClientApp

    from fedtune.runtime.flower import client_app as fedtune_client

    dirs = {
        fedtune_client.config_text(config): {"state-dir": str(out / "client_state"), "export-dir": str(out / "clients")}
        for config, out in runs
    }

    def with_node_dirs(handler: Any) -> Any:
        def handle(message: Any, context: Any) -> Any:
            settings = message.content.get("config")
            chosen = dirs.get(str(settings.get("fedtune-config", ""))) if isinstance(settings, ConfigRecord) else None
            node_config = {k: v for k, v in context.node_config.items() if k not in ("state-dir", "export-dir")}
            return handler(message, replace(context, node_config={**node_config, **(chosen or {})}))

        return handle

    app = ClientApp()
    app.train()(with_node_dirs(fedtune_client.train))
    app.evaluate()(with_node_dirs(fedtune_client.personal_evaluate))
    app.query()(with_node_dirs(fedtune_client.identify))
    return app


def simulate(config: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine; returns the run's summary."""
    return simulate_many([(config, out)], resume=resume, overwrite=overwrite)[0]


def simulate_many(runs: list[tuple[RunConfig, Path]], resume: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    """Several runs, one after another, on one start of the simulation engine.

    Ray and its actors start once (the slow part on a small machine); the ClientApp keeps
    one federation per config, so the runs do not see each other's state. All runs need
    the same number of clients (one SuperNode each).
    """
    quiet_flower()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtune.runtime.flower.client_app import config_text
    from fedtune.runtime.flower.server_app import run_server

    if len({config.clients for config, _ in runs}) != 1:
        raise ValueError("runs sharing one simulation need the same number of clients")
    if any(config.flower.node_partitions for config, _ in runs):
        raise ValueError("flower.node_partitions names deployed SuperNodes; the simulation engine makes its own nodes")
    if len({config_text(config) for config, _ in runs}) != len(runs):
        # a client finds its run's state dir by the run's config
        raise ValueError("runs sharing one simulation need different configs (e.g. another seed)")
    client_app = simulation_client_app(runs)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for config, out in runs:
            run_server(grid, config, out, resume=resume, overwrite=overwrite)

    first = runs[0][0]
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=first.clients, backend_config=backend_config(first))
    summaries = []
    for _, out in runs:
        summary_file = out / "summary.json"
        if not summary_file.exists():
            raise RuntimeError(f"the Flower simulation ended without writing {summary_file}; see the log above")
        summaries.append(json.loads(summary_file.read_text()))
    return summaries
