"""Communication and client memory of every method on the 20NG configs: exact bytes per
round, the local state each client keeps between rounds, and its training memory."""

from __future__ import annotations

from pathlib import Path

from common import ROOT, write

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
    from fedtune.state import num_bytes

    rows, memory = [], []
    for label, (_, path, extra) in BYTES_METHODS.items():
        overrides = ["rounds=2", "local_steps=1", "eval_every=100", "max_eval_examples=16", "max_client_eval_examples=2",
                     "personalised_eval=false", "progress=false", "max_seq_len=64", *extra]  # fmt: skip
        config = load_config(ROOT / path, overrides)
        simulator = Simulator(build_federation(config))
        simulator.run()
        local_bytes = max((num_bytes(state) for _, state in simulator.store.items()), default=0)
        memory.append(
            {
                "method": label,
                "client_local_state_bytes": local_bytes,
                "client_train_state_bytes": max(r["client_train_state_bytes"] for r in simulator.history),
            }
        )
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
            "client_memory": memory,
        },
    )
