"""Training throughput and GPU memory of SmolLM2-135M on Dolly, per method and precision (GPU only).

Each job is two rounds of the Dolly config on two clients; tokens/s is taken from the second
round, so CUDA's first-call set-up (kernel selection, allocator growth) is not counted. The
peak is ``torch.cuda.max_memory_allocated`` over the whole run: frozen model, client training
state, activations and evaluation together.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from common import ROOT, write

from fedtune.config import load_config
from fedtune.runtime.engine import build_federation
from fedtune.runtime.simulator import Simulator

CONFIG = ROOT / "configs" / "smollm2-dolly-fed-alora.yaml"
BUDGET = {
    "rounds": 2, "fraction": 0.2, "local_steps": 25, "batch_size": 8, "max_seq_len": 256, "eval_every": 2,
    "max_eval_examples": 16, "max_client_eval_examples": 4, "device": "cuda", "progress": False,
}  # fmt: skip
JOBS = [
    ("fedit", "fp32"), ("fedit", "bf16"), ("ffa-lora", "bf16"), ("fed-alora", "bf16"),
    ("fedavg-full", "bf16"), ("fedavg-galore", "bf16"),
]  # fmt: skip
LEARNING_RATES = {"fedavg-full": 1e-4, "fedavg-galore": 1e-3}  # as in the beyond-lora study


def _job(method: str, precision: str) -> dict:
    settings = {**BUDGET, "method": method, "precision": precision}
    if method in LEARNING_RATES:
        settings["lr"] = LEARNING_RATES[method]
    simulator = Simulator(build_federation(load_config(CONFIG, [f"{k}={v}" for k, v in settings.items()])))
    summary = simulator.run()
    warm = simulator.history[-1]
    result = {
        "method": method,
        "precision": precision,
        "tokens_per_second": warm["train_tokens_per_s"],
        "tokens_timed": warm["train_tokens"],
        "gpu_peak_memory_bytes": summary["gpu_peak_memory_bytes"],
        "client_train_state_bytes": warm["client_train_state_bytes"],
        "final_train_loss": summary["final_train_loss"],
    }
    del simulator
    gc.collect()
    torch.cuda.empty_cache()
    return result


def bench_gpu(out: Path) -> None:
    if not torch.cuda.is_available():
        print("gpu: skipped, no CUDA device (an earlier bench/results/gpu_training.json is kept)")
        return
    results = []
    for method, precision in JOBS:
        try:
            results.append(_job(method, precision))
        except ImportError as error:  # GaLore's package needs bitsandbytes, which a machine may lack
            results.append({"method": method, "precision": precision, "error": f"{type(error).__name__}: {error}"})
    job = (
        f"SmolLM2-135M-Instruct on Dolly, 2 clients x {BUDGET['local_steps']} local steps of {BUDGET['batch_size']} x "
        f"{BUDGET['max_seq_len']} tokens per round; tokens/s from round 2 of 2"
    )
    write(out, "gpu_training", {"job": job, "results": results})
