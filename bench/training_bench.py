"""Local training: the simulator's client turn vs a plain PyTorch/peft loop, and vs a
FlowerTune-style client that loads the base model again for every round."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from common import DEMO, write


def _plain_loop(batches: list, lr: float, bf16: bool = False) -> float:
    """What a user would write by hand: peft model, AdamW, over exactly the batches the client
    turn trained on (lengths, hence padding and compute, are the same), in fp32 or under bf16
    autocast. Seconds."""
    import contextlib

    from peft import LoraConfig, TaskType, get_peft_model

    from fedtune.models import load_model

    model = load_model("minilm", "classification", num_labels=20, seed=0).model
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_throughput(out: Path, steps: int = 20, repeats: int = 6) -> None:
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation, client_turn, derive_seed
    from fedtune.runtime.local_training import batches
    from fedtune.runtime.server import FederatedServer

    config = load_config(DEMO, [f"local_steps={steps}", "progress=false", "method=fedit"])  # precision: the default
    fed = build_federation(config)
    server = FederatedServer(fed)
    client = max(range(config.clients), key=lambda k: fed.data.clients[k].num_examples)
    examples = fed.data.clients[client].train
    sim_times, plain_times, bf16_times = [], [], []
    def turn(repeat: int, _: list) -> float:
        received, _ = server.payload(client)
        start = time.perf_counter()
        client_turn(fed, client, repeat + 1, received, {})
        return time.perf_counter() - start

    loops = {
        "fedtune": (turn, sim_times),
        "fp32": (lambda repeat, same: _plain_loop(same, config.lr), plain_times),
        "bf16": (lambda repeat, same: _plain_loop(same, config.lr, bf16=True), bf16_times),
    }
    order = list(loops)
    for repeat in range(repeats):  # interleaved, the order rotating: the machine's drift hits all three alike
        # the batches the turn draws (client_turn seeds its batch order from (seed, round, client))
        generator = torch.Generator().manual_seed(derive_seed(config.seed, repeat + 1, client))
        same = list(batches(examples, config.batch_size, steps, generator, fed.pad_id))
        for name in order[repeat % 3 :] + order[: repeat % 3]:
            run, times = loops[name]
            times.append(run(repeat, same))
    sim_rate = steps * config.batch_size / statistics.median(sim_times)
    plain_rate = steps * config.batch_size / statistics.median(plain_times)
    bf16_rate = steps * config.batch_size / statistics.median(bf16_times)
    write(
        out,
        "training_throughput",
        {
            "job": f"MiniLM + LoRA r=8 (query, value), batch {config.batch_size} x <= {config.max_seq_len} tokens, {steps} steps",
            "definition": "examples/s of a whole client turn (state in, optimizer, training, state out) at fedtune's "
            "default precision vs a hand-written peft + AdamW loop over the same batches, in fp32 and under bf16 "
            "autocast; medians of interleaved repeats (order rotating), each on the same batches",
            "fedtune_precision": fed.precision,
            "simulator_examples_per_second": sim_rate,
            "plain_loop_examples_per_second": plain_rate,
            "plain_bf16_loop_examples_per_second": bf16_rate,
            "simulator_seconds": sim_times,
            "plain_loop_seconds": plain_times,
            "plain_bf16_loop_seconds": bf16_times,
            "ratio": sim_rate / plain_rate,
            "ratio_to_bf16_loop": sim_rate / bf16_rate,
            "target": ">= 1.3 x the fp32 loop and >= 0.95 x the bf16 loop (where the CPU has native bf16; else >= 0.95 x fp32)",
            "passed": (sim_rate / plain_rate >= 1.3 and sim_rate / bf16_rate >= 0.95)
            if fed.precision == "bf16"
            else sim_rate / plain_rate >= 0.95,
        },
    )


def bench_reload(out: Path, rounds: int = 3, local_steps: int = 2) -> None:
    """Round time when every client turn starts by loading the model (FlowerTune's client_fn
    pattern) vs the simulator's load-once, swap-state design."""
    from fedtune.config import load_config
    from fedtune.models import bind_lora, load_model
    from fedtune.runtime.engine import build_federation, client_turn
    from fedtune.runtime.server import FederatedServer

    config = load_config(DEMO, [f"local_steps={local_steps}", "progress=false", "method=fedit", f"rounds={rounds}"])
    fed = build_federation(config)
    server = FederatedServer(fed)
    shared_rounds, reload_rounds, load_seconds = [], [], []
    for round_num in range(1, rounds + 1):
        start = time.perf_counter()
        for client in server.sampled(round_num):
            received, _ = server.payload(client)
            client_turn(fed, client, round_num, received, {})
        shared_rounds.append(time.perf_counter() - start)
        start = time.perf_counter()
        for client in server.sampled(round_num):
            load_start = time.perf_counter()
            loaded = load_model(config.model, "classification", fed.data.task.num_labels, seed=config.seed)
            fed.binding = bind_lora(loaded, "classification", config.lora)
            load_seconds.append(time.perf_counter() - load_start)
            received, _ = server.payload(client)
            client_turn(fed, client, round_num, received, {})
        reload_rounds.append(time.perf_counter() - start)
    write(
        out,
        "reload_vs_shared_model",
        {
            "job": f"configs/demo.yaml, method=fedit, 10 clients, local_steps={local_steps}, {rounds} rounds (MiniLM)",
            "simulator_round_seconds": shared_rounds,
            "reload_every_round_seconds": reload_rounds,
            "mean_model_load_seconds": sum(load_seconds) / len(load_seconds),
            "ratio_reload_over_simulator": sum(reload_rounds) / sum(shared_rounds),
            "note": "MiniLM loads in well under a second; the gap grows with the model (SmolLM2 from its GGUF "
            "takes about 20 s the first time, a 7B model minutes)",
        },
    )
