"""The distributed runtime: Flower's simulation engine vs the embedded simulator."""

from __future__ import annotations

import time
from pathlib import Path

from common import DEMO, write


def bench_flower(out: Path) -> None:
    """Round time of the same job on the Flower simulation engine and in the simulator."""
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.flower.simulate import simulate
    from fedtune.runtime.simulator import Simulator

    overrides = ["rounds=5", "local_steps=2", "max_eval_examples=100", "personalised_eval=false", "progress=false",
                 "flower.client_cpus=2", "method=fedit"]  # fmt: skip
    config = load_config(DEMO, overrides)
    simulator = Simulator(build_federation(config))
    simulator.run()
    flower_dir = out / "tmp" / "flower-run"
    start = time.perf_counter()
    simulate(config, flower_dir, overwrite=True)
    flower_wall = time.perf_counter() - start
    from fedtune.rundir import read_metrics

    flower_rows = read_metrics(flower_dir)
    sim_rounds = [r["train_seconds"] + r["aggregate_seconds"] for r in simulator.history]
    flower_rounds = [r["train_seconds"] for r in flower_rows]
    write(
        out,
        "flower_vs_simulator",
        {
            "job": "configs/demo.yaml with method=fedit, 10 clients, 5 rounds, local_steps=2 (MiniLM)",
            "definition": "round = sending, local training of every sampled client, receiving, aggregating (evaluation apart)",
            "simulator_round_seconds": sim_rounds,
            "flower_round_seconds": flower_rounds,
            "simulator_mean_round_seconds": sum(sim_rounds) / len(sim_rounds),
            "flower_mean_round_seconds": sum(flower_rounds) / len(flower_rounds),
            "flower_mean_round_seconds_after_first": sum(flower_rounds[1:]) / len(flower_rounds[1:]),
            "ratio_flower_over_simulator": (sum(flower_rounds) / len(flower_rounds)) / (sum(sim_rounds) / len(sim_rounds)),
            "flower_wall_seconds_including_ray_start": flower_wall,
            "flower_model_loads_per_process_by_round": [r["model_loads"] for r in flower_rows],
        },
    )
