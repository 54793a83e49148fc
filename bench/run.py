"""fedtune benchmarks (``make bench``): each writes ``bench/results/<name>.json``, and
``docs/results/performance.md`` summarises them all.

- ``overhead``: the default job's share of round time outside forward/backward/optimizer (<= 5 %).
- ``throughput``: a client turn at the default precision vs hand-written peft + AdamW loops in fp32
  and under bf16 autocast, examples/s (>= 1.3 x fp32 and >= 0.95 x bf16 where the CPU has native bf16).
- ``precision``: the default job in fp32 and at precision=auto, 2 seeds: final accuracy (within 1
  point) and evaluation's share of the run's time (<= 10 %); one evaluation's cost, eager and compiled.
- ``reload``: round time when every client reloads the model (FlowerTune's pattern) vs the simulator.
- ``memory``: peak RSS of 100 vs 2 clients (<= RSS_2 + 100 x adapter + 200 MB).
- ``flexlora``: FlexLoRA's QR fast path vs the dense SVD on 7B-shaped adapters (>= 50x, O((d_in + d_out) R) memory).
- ``aggregation``: every method's aggregation time per 4096 x 4096 module, 10 clients.
- ``bytes``: exact bytes per round and client memory of every method on the 20NG configs.
- ``flower``: the same job on Flower's simulation engine vs the simulator, and model loads per process.
- ``gpu``: SmolLM2 training tokens/s and GPU peak memory per method and precision (skipped without CUDA).

Usage: python bench/run.py [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregation_bench import bench_aggregation, bench_flexlora, flexlora_memory_child  # noqa: E402
from checkpointing_bench import bench_checkpointing, checkpointing_child  # noqa: E402
from common import ROOT  # noqa: E402
from communication_bench import bench_bytes  # noqa: E402
from flower_bench import bench_flower  # noqa: E402
from gpu_bench import bench_gpu  # noqa: E402
from precision_bench import bench_precision  # noqa: E402
from quantize_bench import bench_quantize  # noqa: E402
from report import write_performance_report  # noqa: E402
from simulator_bench import bench_memory, bench_overhead, memory_child  # noqa: E402
from training_bench import bench_reload, bench_throughput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--only", nargs="*", default=None, help="overhead, throughput, precision, reload, memory, checkpointing, quantize, flexlora, aggregation, bytes, flower, gpu")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the default job for the overhead benchmark")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flex-memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dense-modules", type=int, default=3, help="modules timed with the dense SVD reference")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child is not None:
        memory_child(args.memory_child, Path(args.child_out))
        return
    if args.checkpointing_child is not None:
        checkpointing_child(args.checkpointing_child, Path(args.child_out))
        return
    if args.flex_memory_child is not None:
        flexlora_memory_child(args.flex_memory_child, Path(args.child_out))
        return
    out = Path(args.out)
    everything = ["overhead", "throughput", "precision", "reload", "memory", "checkpointing", "quantize", "flexlora", "aggregation", "bytes", "flower", "gpu"]
    chosen = set(args.only or everything)
    if "overhead" in chosen:
        bench_overhead(out, args.rounds)
    if "memory" in chosen:
        bench_memory(out)
    if "checkpointing" in chosen:
        bench_checkpointing(out)
    if "quantize" in chosen:
        bench_quantize(out)
    if "flexlora" in chosen:
        bench_flexlora(out, args.dense_modules)
    if "bytes" in chosen:
        bench_bytes(out)
    if "flower" in chosen:
        bench_flower(out)
    if "throughput" in chosen:
        bench_throughput(out)
    if "precision" in chosen:
        bench_precision(out)
    if "reload" in chosen:
        bench_reload(out)
    if "aggregation" in chosen:
        bench_aggregation(out)
    if "gpu" in chosen:
        bench_gpu(out)
    report = write_performance_report(out, ROOT / "docs" / "results" / "performance.md")
    print(f"summary: {report}")


if __name__ == "__main__":
    main()

