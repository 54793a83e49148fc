"""Aggregation on 7B-shaped adapters: FlexLoRA's fast path vs its dense reference."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RUN, write

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
        subprocess.run([sys.executable, str(RUN), "--flex-memory-child", path, "--child-out", str(result_file)], check=True)
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


AGG_MODULES = 4
AGG_HOMOGENEOUS_RANK = 16


def _method_inputs(method_name: str, seed: int):
    """Server state and 10 client uploads for one 4096 x 4096 module, as each method sees them."""
    from fedtune.methods import ClientUpload
    from fedtune.methods.fed_alora import FedALoRA, FedALoRADecomposed
    from fedtune.methods.flexlora import FlexLoRA
    from fedtune.methods.flora import FLoRA
    from fedtune.methods.hafl import HAFL, HAFLSettings
    from fedtune.methods.hetlora import HetLoRA
    from fedtune.methods.lora_sharing import FedIT, FedSALoRA, FFALoRA
    from fedtune.resources import RankPlan

    g = torch.Generator().manual_seed(seed)
    d, r_max = FLEX_DIM, max(FLEX_RANKS)
    plan = RankPlan(FLEX_RANKS, r_max, alpha=16.0)
    homogeneous = {"fedit": FedIT(), "ffa-lora": FFALoRA(), "fedsa-lora": FedSALoRA(), "fed-alora": FedALoRA()}

    def lora(rank: int) -> dict[str, torch.Tensor]:
        return {"m.lora_A": torch.randn(rank, d, generator=g), "m.lora_B": torch.randn(d, rank, generator=g)}

    if method_name in homogeneous:
        method = homogeneous[method_name]
        server = method.server_init(lora(AGG_HOMOGENEOUS_RANK))
        uploads = [ClientUpload(k, 100, method.client_finish(lora(AGG_HOMOGENEOUS_RANK), {})[0]) for k in range(10)]
        return method, server, uploads
    if method_name == "fed-alora-decomposed":
        method = FedALoRADecomposed()
        server = {"m.alora_B_base": torch.zeros(d, 16)}
        uploads = [ClientUpload(k, 100, {"m.alora_B1": torch.randn(r, 16, generator=g), "m.alora_B2": torch.randn(d, r, generator=g)}) for k, r in enumerate(FLEX_RANKS)]
        return method, server, uploads
    if method_name == "hafl":
        method = HAFL(plan, HAFLSettings())
        server = method.server_init(lora(r_max))
        uploads = []
        for k, r in enumerate(FLEX_RANKS):
            index = torch.randperm(r_max, generator=g)[:r].sort().values
            upload = lora(r)
            upload["m.hafl_index"] = index.to(torch.int32)
            uploads.append(ClientUpload(k, 100, upload))
        return method, server, uploads
    if method_name in ("rolora", "fedsvd"):
        from fedtune.methods.frozen_factor import FedSVD, RoLoRA

        method = RoLoRA() if method_name == "rolora" else FedSVD()
        server = method.server_init(lora(AGG_HOMOGENEOUS_RANK))  # round 1: B trains, A frozen
        uploads = [ClientUpload(k, 100, {"m.lora_B": torch.randn(d, AGG_HOMOGENEOUS_RANK, generator=g)}) for k in range(10)]
        return method, server, uploads
    if method_name == "fedex-lora":
        from fedtune.methods.fedex_lora import FedExLoRA

        method = FedExLoRA(RankPlan((AGG_HOMOGENEOUS_RANK,) * 10, AGG_HOMOGENEOUS_RANK, alpha=16.0))
        server = method.server_init({**lora(AGG_HOMOGENEOUS_RANK), "m.base_layer.weight": torch.zeros(d, d)})
        uploads = [ClientUpload(k, 100, lora(AGG_HOMOGENEOUS_RANK)) for k in range(10)]
        return method, server, uploads
    if method_name == "fedit+scaffold":
        from fedtune.methods.scaffold import DELTA_C, Scaffold

        method = Scaffold(FedIT(), lr=1e-3, clients=10)
        server = method.server_init(lora(AGG_HOMOGENEOUS_RANK))
        uploads = []
        for k in range(10):
            upload = lora(AGG_HOMOGENEOUS_RANK)
            upload.update({DELTA_C + key: torch.randn(v.shape, generator=g) for key, v in list(upload.items())})
            uploads.append(ClientUpload(k, 100, upload))
        return method, server, uploads
    if method_name == "fedit+fedadam":
        from fedtune.methods.server_optimizers import ServerOptimizer, ServerOptSettings

        class WithServerOptimizer:  # what FederatedServer.receive does: aggregate, then the server step
            def __init__(self) -> None:
                self.method, self.optimizer = FedIT(), ServerOptimizer(ServerOptSettings(name="fedadam"))

            def aggregate(self, server, uploads):
                return self.optimizer.step(server, self.method.aggregate(server, uploads))

        server = lora(AGG_HOMOGENEOUS_RANK)
        uploads = [ClientUpload(k, 100, lora(AGG_HOMOGENEOUS_RANK)) for k in range(10)]
        return WithServerOptimizer(), server, uploads
    method = {"hetlora": HetLoRA(plan), "flexlora": FlexLoRA(plan), "flora": FLoRA(plan)}[method_name]
    base = {"m.base_layer.weight": torch.zeros(d, d)} if method_name == "flora" else {}
    server = method.server_init({**lora(r_max), **base})
    uploads = [ClientUpload(k, 100, lora(r)) for k, r in enumerate(FLEX_RANKS)]
    return method, server, uploads


def bench_aggregation(out: Path) -> None:
    """Seconds per 4096 x 4096 module of each method's server aggregation, 10 clients."""
    names = [
        "fedit", "ffa-lora", "fedsa-lora", "fed-alora", "hetlora", "flexlora", "flora", "fed-alora-decomposed", "hafl",
        "rolora", "fedsvd", "fedex-lora", "fedit+scaffold", "fedit+fedadam",
    ]  # fmt: skip
    per_module = {}
    for name in names:
        times = []
        for module in range(AGG_MODULES):
            method, server, uploads = _method_inputs(name, module)
            start = time.perf_counter()
            method.aggregate(server, uploads)
            times.append(time.perf_counter() - start)
        per_module[name] = sum(times) / len(times)
    write(
        out,
        "aggregation_per_method",
        {
            "shape": f"one 4096 x 4096 module, 10 clients; homogeneous methods rank {AGG_HOMOGENEOUS_RANK}, "
            f"heterogeneous ranks {list(FLEX_RANKS)}; timed on {AGG_MODULES} modules",
            "seconds_per_module": per_module,
            "projected_seconds_for_7b_128_modules": {k: v * 128 for k, v in per_module.items()},
            "note": "FLoRA's and FedEx-LoRA's times include folding into the 4096 x 4096 base weight; FedSVD's its "
            "re-factorisation (QR + SVD of the r x r core); fedit+scaffold the control-variate update, fedit+fedadam "
            "the server optimiser's step after the mean.",
        },
    )
