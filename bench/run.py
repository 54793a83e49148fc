"""fedtune benchmarks (``make bench``): each writes ``bench/results/<name>.json``.

- ``overhead``: on the default job (configs/demo.yaml), the share of each round's wall time
  spent outside forward/backward/optimizer steps (target <= 5 %).
- ``memory``: peak RSS of a 100-client vs a 2-client MiniLM LoRA federation with personal
  parts (Fed-ALoRA, keep), each in its own process (target: RSS_100 <= RSS_2 + 100 x adapter
  size + 200 MB, i.e. one base model, not one per client).

- ``flexlora``: FlexLoRA aggregation on 7B-shaped adapters (32 layers x 4 modules of
  4096 x 4096, 10 clients with ranks from {4, 8, 16, 32, 64}): the QR fast path on all 128
  modules vs the dense SVD reference on a few, per-module time and peak extra memory
  (target: >= 50x faster, memory O((d_in + d_out) R)).

- ``flower``: round time of the same MiniLM job on Flower's simulation engine vs the
  simulator, and how often each Flower client process loaded the model.

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


FLEX_RANKS = (4, 8, 16, 32, 64, 4, 8, 16, 32, 64)
FLEX_DIM = 4096


def _flex_module(seed: int):
    from fedtune.methods import ClientUpload

    g = torch.Generator().manual_seed(seed)
    uploads = []
    for client, rank in enumerate(FLEX_RANKS):
        a = torch.randn(rank, FLEX_DIM, generator=g) / FLEX_DIM**0.5
        b = torch.randn(FLEX_DIM, rank, generator=g) / rank**0.5
        uploads.append(ClientUpload(client, 100 + 10 * client, {"m.lora_A": a, "m.lora_B": b}))
    server = {"m.lora_A": torch.zeros(max(FLEX_RANKS), FLEX_DIM), "m.lora_B": torch.zeros(FLEX_DIM, max(FLEX_RANKS))}
    return server, uploads


def _flex_method(dense: bool):
    from fedtune.methods.flexlora import FlexLoRA
    from fedtune.resources import RankPlan

    return FlexLoRA(RankPlan(FLEX_RANKS, max(FLEX_RANKS), alpha=16.0), dense=dense)


def flexlora_memory_child(path: str, result_file: Path) -> None:
    """Peak RSS growth of one module's aggregation, above the inputs (own process)."""
    import ctypes
    import threading

    import psutil

    server, uploads = _flex_module(0)
    method = _flex_method(path == "dense")
    method.aggregate(server, uploads)  # warm-up: first-call allocations of the LAPACK routines
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back so RSS starts at the inputs
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    method.aggregate(server, uploads)
    done.set()
    sampler.join()
    result_file.write_text(json.dumps({"extra_peak_bytes": peak - baseline}))


def bench_flexlora(out: Path, dense_modules: int) -> None:
    modules = 32 * 4
    fast_method, dense_method = _flex_method(False), _flex_method(True)
    fast_times, dense_times, errors = [], [], []
    for module in range(modules):
        server, uploads = _flex_module(module)
        start = time.perf_counter()
        fast = fast_method.aggregate(server, uploads)
        fast_times.append(time.perf_counter() - start)
        if module < dense_modules:
            start = time.perf_counter()
            dense = dense_method.aggregate(server, uploads)
            dense_times.append(time.perf_counter() - start)
            w_fast = fast["m.lora_B"].double() @ fast["m.lora_A"].double()
            w_dense = dense["m.lora_B"].double() @ dense["m.lora_A"].double()
            errors.append(float((w_fast - w_dense).norm() / w_dense.norm()))
    memory = {}
    for path in ("fast", "dense"):
        result_file = out / f".flex-{path}.json"
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--flex-memory-child", path, "--child-out", str(result_file)], check=True)
        memory[path] = json.loads(result_file.read_text())["extra_peak_bytes"]
        result_file.unlink()
    fast_per_module = sum(fast_times) / len(fast_times)
    dense_per_module = sum(dense_times) / len(dense_times)
    total_rank = sum(FLEX_RANKS)
    write(
        out,
        "flexlora_aggregation",
        {
            "shape": f"{modules} modules of {FLEX_DIM} x {FLEX_DIM}, clients' ranks {list(FLEX_RANKS)} (R = {total_rank})",
            "fast_seconds_per_module": fast_per_module,
            "fast_seconds_all_modules": sum(fast_times),
            "dense_seconds_per_module": dense_per_module,
            "dense_modules_timed": len(dense_times),
            "speedup": dense_per_module / fast_per_module,
            "target_speedup": ">= 50",
            "passed": dense_per_module / fast_per_module >= 50,
            "max_relative_error_vs_dense_rank_r_max": max(errors),
            "extra_peak_memory_fast_mb": memory["fast"] / 2**20,
            "extra_peak_memory_dense_mb": memory["dense"] / 2**20,
            "reference_sizes_mb": {
                "(d_in + d_out) R float32": 2 * FLEX_DIM * total_rank * 4 / 2**20,
                "d_in d_out float32": FLEX_DIM * FLEX_DIM * 4 / 2**20,
            },
        },
    )


BYTES_METHODS = {
    # name: (method, config file or None, extra overrides)
    "fedit": ("fedit", "configs/fedit.yaml", []),
    "ffa-lora": ("ffa-lora", "configs/ffa-lora.yaml", []),
    "fedsa-lora": ("fedsa-lora", "configs/fedsa-lora.yaml", []),
    "fed-alora (r=8)": ("fed-alora", "configs/fed-alora.yaml", []),
    "fedavg-full": ("fedavg-full", "configs/fedavg-full.yaml", []),
    "fedavg-galore": ("fedavg-galore", "configs/fedavg-galore.yaml", []),
    "hetlora": ("hetlora", "configs/hetero/20ng-hetlora.yaml", []),
    "flexlora": ("flexlora", "configs/hetero/20ng-flexlora.yaml", []),
    "flora": ("flora", "configs/hetero/20ng-flora.yaml", []),
    "fed-alora (decomposed)": ("fed-alora", "configs/hetero/20ng-fed-alora.yaml", []),
    "hafl (freezing)": ("hafl", "configs/hetero/20ng-hafl.yaml", []),
    "hafl (truncation)": ("hafl", "configs/hetero/20ng-hafl-truncation.yaml", []),
}


def bench_bytes(out: Path) -> None:
    """Exact bytes per round of every method on the 20NG configs (2 rounds, 1 local step)."""
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator

    rows = []
    for label, (_, path, extra) in BYTES_METHODS.items():
        overrides = ["rounds=2", "local_steps=1", "eval_every=100", "max_eval_examples=16", "max_client_eval_examples=2",
                     "personalised_eval=false", "progress=false", "max_seq_len=64", *extra]  # fmt: skip
        config = load_config(ROOT / path, overrides)
        simulator = Simulator(build_federation(config))
        simulator.run()
        for row in simulator.history:
            rows.append(
                {
                    "method": label,
                    "round": row["round"],
                    "bytes_up": row["bytes_up"],
                    "bytes_down": row["bytes_down"],
                    "bytes_up_per_client": row["bytes_up_per_client"],
                    "client_ranks": config.client_ranks,
                }
            )
    lines = ["| method | round | uplink (all clients) | downlink (all clients) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['round']} | {r['bytes_up']:,} | {r['bytes_down']:,} |")
    write(
        out,
        "bytes_per_round",
        {
            "job": "20NG + MiniLM, 10 clients, LoRA on query/value; homogeneous methods r=8, heterogeneous tiers {2: 0.4, 4: 0.3, 8: 0.3}",
            "rows": rows,
            "markdown": "\n".join(lines),
        },
    )


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--only", nargs="*", default=None, help="overhead, memory, flexlora, bytes, flower")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the default job for the overhead benchmark")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flex-memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dense-modules", type=int, default=3, help="modules timed with the dense SVD reference")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child is not None:
        memory_child(args.memory_child, Path(args.child_out))
        return
    if args.flex_memory_child is not None:
        flexlora_memory_child(args.flex_memory_child, Path(args.child_out))
        return
    out = Path(args.out)
    chosen = set(args.only or ["overhead", "memory", "flexlora", "bytes", "flower"])
    if "overhead" in chosen:
        bench_overhead(out, args.rounds)
    if "memory" in chosen:
        bench_memory(out)
    if "flexlora" in chosen:
        bench_flexlora(out, args.dense_modules)
    if "bytes" in chosen:
        bench_bytes(out)
    if "flower" in chosen:
        bench_flower(out)


if __name__ == "__main__":
    main()
