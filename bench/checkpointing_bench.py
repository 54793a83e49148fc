"""gradient_checkpointing: peak memory of one SmolLM2-135M client turn at batch 4 x 512 tokens.

Each setting runs in its own process, so ru_maxrss (peak resident memory) is that setting's
alone: the peak after the federation is built (model and data loaded) is the baseline, and the
client turn's extra peak above it is what training adds (activations, gradients, optimizer).
The rows are long instruction/response texts written here, so every sequence fills 512 tokens."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RUN, write

SETTINGS = ["model=smollm2-135m", "method=fedit", "clients=1", "rounds=1", "local_steps=2", "batch_size=4",
            "max_seq_len=512", "max_eval_examples=4", "personalised_eval=false", "progress=false", "partition=iid"]  # fmt: skip


def _long_rows(path: Path, rows: int = 8) -> Path:
    sentence = "The federated server averages the adapters that every client trained on its own private data. "
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Summarise note {i}: " + sentence * 40, "response": sentence * 20}) + "\n")
    return path


def checkpointing_child(checkpointing: str, result_file: Path) -> None:
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation, client_turn
    from fedtune.runtime.simulator import Simulator

    data = _long_rows(result_file.with_suffix(".jsonl"))
    fed = build_federation(load_config(None, [*SETTINGS, f"dataset={data}", f"gradient_checkpointing={checkpointing}"]))
    sim = Simulator(fed)
    lengths = [len(e.input_ids) for e in fed.data.clients[0].train[:4]]
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    client_turn(fed, 0, 1, fed.method.download(sim.server, 0), {})
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result_file.write_text(json.dumps({
        "peak_after_load_mb": loaded_kib / 1024, "peak_mb": peak_kib / 1024, "turn_extra_peak_mb": (peak_kib - loaded_kib) / 1024,
        "turn_seconds": seconds, "sequence_lengths": lengths, "precision": fed.precision,
    }))  # fmt: skip


def bench_checkpointing(out: Path) -> None:
    results = {}
    out.mkdir(parents=True, exist_ok=True)
    for setting in ("false", "true"):
        result_file = out / f".checkpointing-{setting}.json"
        subprocess.run([sys.executable, str(RUN), "--checkpointing-child", setting, "--child-out", str(result_file)], check=True)
        results[setting] = json.loads(result_file.read_text())
        result_file.unlink()
        result_file.with_suffix(".jsonl").unlink(missing_ok=True)
    plain, checkpointed = results["false"], results["true"]
    write(
        out,
        "gradient_checkpointing_memory",
        {
            "job": "one SmolLM2-135M FedIT client turn (LoRA r=8 q_proj/v_proj, AdamW), 2 steps at batch 4 x 512 tokens",
            "definition": "turn_extra_peak_mb = peak RSS during the client turn minus peak RSS once the model and data "
            "are loaded, each setting in its own process",
            "without": plain,
            "with": checkpointed,
            "extra_peak_ratio": checkpointed["turn_extra_peak_mb"] / plain["turn_extra_peak_mb"],
            "time_ratio": checkpointed["turn_seconds"] / plain["turn_seconds"],
        },
    )
