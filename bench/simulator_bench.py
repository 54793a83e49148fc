"""The embedded simulator: per-round overhead and memory with many clients."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from common import DEMO, ROOT, RUN, write


def bench_overhead(out: Path, rounds: int) -> None:
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator

    config = load_config(DEMO, [f"rounds={rounds}", "progress=false"])
    fed = build_federation(config)
    simulator = Simulator(fed)
    simulator.run()
    per_round = []
    for row in simulator.history:
        fl_round = row["train_seconds"] + row["aggregate_seconds"]
        per_round.append(
            {
                "round": row["round"],
                "round_seconds": fl_round,
                "compute_seconds": row["compute_seconds"],
                "overhead_share": (fl_round - row["compute_seconds"]) / fl_round,
                "eval_seconds": row["eval_seconds"],
            }
        )
    total = sum(r["round_seconds"] for r in per_round)
    compute = sum(r["compute_seconds"] for r in per_round)
    write(
        out,
        "simulator_overhead",
        {
            "job": str(DEMO.relative_to(ROOT)),
            "rounds": rounds,
            "definition": "round = sampling + every client's turn (state in/out, local training) + aggregation; "
            "compute = time inside forward/backward/optimizer steps; evaluation is reported apart",
            "overhead_share": (total - compute) / total,
            "target": "<= 0.05",
            "passed": (total - compute) / total <= 0.05,
            "per_round": per_round,
        },
    )


def memory_child(clients: int, result_file: Path) -> None:
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator
    from fedtune.state import num_bytes

    overrides = [
        f"clients={clients}", "rounds=1", "local_steps=1", "batch_size=4", "max_seq_len=64",
        "fed_alora.a_persistence=keep", "max_eval_examples=16", "max_client_eval_examples=1",
        "personalised_eval=false", "progress=false", "partition=iid",
    ]  # fmt: skip
    fed = build_federation(load_config(DEMO, overrides))
    simulator = Simulator(fed)
    simulator.run()
    adapter_bytes = num_bytes(fed.initial_state())
    stored = sum(num_bytes(state) for _, state in simulator.store.items())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    result_file.write_text(
        json.dumps({"clients": clients, "peak_rss_bytes": peak_kib * 1024, "adapter_bytes": adapter_bytes, "client_state_bytes": stored})
    )


def bench_memory(out: Path) -> None:
    results = {}
    for clients in (2, 100):
        result_file = out / f".memory-{clients}.json"
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(RUN), "--memory-child", str(clients), "--child-out", str(result_file)], check=True
        )
        results[clients] = json.loads(result_file.read_text())
        result_file.unlink()
    small, large = results[2], results[100]
    budget = small["peak_rss_bytes"] + 100 * large["adapter_bytes"] + 200 * 2**20
    write(
        out,
        "simulator_memory",
        {
            "job": "configs/demo.yaml with fed-alora keep (personal A per client), MiniLM LoRA r=8",
            "peak_rss_2_clients_mb": small["peak_rss_bytes"] / 2**20,
            "peak_rss_100_clients_mb": large["peak_rss_bytes"] / 2**20,
            "adapter_bytes": large["adapter_bytes"],
            "client_state_bytes_100": large["client_state_bytes"],
            "budget_mb": budget / 2**20,
            "target": "peak_rss_100 <= peak_rss_2 + 100 x adapter + 200 MB",
            "passed": large["peak_rss_bytes"] <= budget,
        },
    )
