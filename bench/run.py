"""fedtune benchmarks (``make bench``): each writes ``bench/results/<name>.json``.

- ``overhead``: on the default job (configs/demo.yaml), the share of each round's wall time
  spent outside forward/backward/optimizer steps (target <= 5 %).
- ``memory``: peak RSS of a 100-client vs a 2-client MiniLM LoRA federation with personal
  parts (Fed-ALoRA, keep), each in its own process (target: RSS_100 <= RSS_2 + 100 x adapter
  size + 200 MB, i.e. one base model, not one per client).

Usage: python bench/run.py [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


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
            [sys.executable, __file__, "--memory-child", str(clients), "--child-out", str(result_file)], check=True
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--only", nargs="*", default=None, help="overhead, memory")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the default job for the overhead benchmark")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child is not None:
        memory_child(args.memory_child, Path(args.child_out))
        return
    out = Path(args.out)
    chosen = set(args.only or ["overhead", "memory"])
    if "overhead" in chosen:
        bench_overhead(out, args.rounds)
    if "memory" in chosen:
        bench_memory(out)


if __name__ == "__main__":
    main()
