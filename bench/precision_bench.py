"""precision=auto against fp32 on the default job: final accuracy at 2 seeds, and the share of
the run spent evaluating (target: accuracy within 1 point, evaluation <= 10 % of round time).

It also measures what one evaluation of the default job's 500 global test examples costs, and
where that time goes, because evaluation frequency (``eval_every``) is what is left to tune:
- the matrix products already run near this CPU's bf16 peak, and fused attention is the rest;
- ``torch.compile`` of the evaluated model, timed with its compile cost, against eager.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import DEMO, ROOT, write


def _run(precision: str, seed: int) -> dict:
    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator

    config = load_config(DEMO, [f"precision={precision}", f"seed={seed}", "progress=false"])
    simulator = Simulator(build_federation(config))
    summary = simulator.run()
    rows = simulator.history
    evaluated = [r for r in rows if "accuracy" in r]
    return {
        "precision_used": summary["precision"],
        "final_accuracy": summary["final"]["accuracy"],
        "final_personal_accuracy": summary["final"].get("personal_accuracy"),
        "rounds": len(rows),
        "evaluated_rounds": [r["round"] for r in evaluated],
        "round_seconds": sum(r["seconds"] for r in rows) / len(rows),
        "train_seconds": sum(r["train_seconds"] for r in rows) / len(rows),
        "eval_seconds": sum(r["eval_seconds"] for r in rows) / len(rows),
        "eval_seconds_per_evaluation": sum(r["eval_seconds"] for r in evaluated) / len(evaluated),
        "eval_share": sum(r["eval_seconds"] for r in rows) / sum(r["seconds"] for r in rows),
        "eval_share_of_evaluated_rounds": sum(r["eval_seconds"] for r in evaluated) / sum(r["seconds"] for r in evaluated),
    }


def _evaluation_cost() -> dict:
    """One global evaluation of the default job (its global test set, at precision=auto):
    eager, the share of fused attention in it, and compiled (first call = compile + run)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fedtune.config import load_config
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.evaluation import evaluate_classification

    fed = build_federation(load_config(DEMO, ["progress=false"]))
    fed.binding.load(fed.initial_state())
    model = fed.binding.model.eval()
    examples = fed.data.test

    def timed(m: torch.nn.Module) -> tuple[float, dict]:
        start = time.perf_counter()
        scores = evaluate_classification(m, examples, fed.config.eval_batch_size, fed.pad_id, fed.device, fed.precision)
        return time.perf_counter() - start, scores

    eager = min(timed(model)[0] for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, eager_scores = timed(model)
    by_op = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(by_op.values())
    matmul = sum(v for k, v in by_op.items() if k in ("aten::addmm", "aten::mm", "aten::bmm"))
    attention = sum(v for k, v in by_op.items() if "scaled_dot_product" in k)
    compiled_model = torch.compile(model, dynamic=True)
    first, _ = timed(compiled_model)
    compiled, compiled_scores = min((timed(compiled_model) for _ in range(3)), key=lambda t: t[0])
    saving = eager - compiled
    return {
        "examples": len(examples),
        "precision": fed.precision,
        "eager_seconds": eager,
        "eager_ms_per_example": 1000 * eager / len(examples),
        "matmul_share": matmul / total,
        "attention_share": attention / total,
        "compiled_first_call_seconds": first,
        "compiled_seconds": compiled,
        "compile_overhead_seconds": first - compiled,
        "evaluations_to_repay_compile": (first - compiled) / saving if saving > 0 else None,
        "same_accuracy_compiled": eager_scores["accuracy"] == compiled_scores["accuracy"],
    }


def bench_precision(out: Path, seeds: tuple[int, ...] = (0, 1)) -> None:
    runs: dict[str, dict[int, dict]] = {"fp32": {}, "auto": {}}
    for seed in seeds:  # interleaved, so both precisions see the same machine state
        for precision in runs:
            runs[precision][seed] = _run(precision, seed)
    mean = {p: sum(r["final_accuracy"] for r in by_seed.values()) / len(seeds) for p, by_seed in runs.items()}
    eval_share = max(r["eval_share"] for r in runs["auto"].values())
    difference = mean["auto"] - mean["fp32"]
    write(
        out,
        "precision_auto_vs_fp32",
        {
            "job": f"{DEMO.relative_to(ROOT)} (every setting as make demo runs it), seeds {list(seeds)}",
            "definition": "final global accuracy per seed in fp32 and at the default precision=auto; evaluation share "
            "= the run's eval seconds / its round seconds (global + personalised evaluation on the job's "
            "eval_every rounds and the last); the share within the evaluated rounds alone is reported beside it",
            "runs": {p: {str(s): r for s, r in by_seed.items()} for p, by_seed in runs.items()},
            "mean_final_accuracy": mean,
            "accuracy_difference_auto_minus_fp32": difference,
            "max_eval_share_auto": eval_share,
            "max_eval_share_of_evaluated_rounds_auto": max(r["eval_share_of_evaluated_rounds"] for r in runs["auto"].values()),
            "evaluation_cost": _evaluation_cost(),
            "target": "|difference| <= 0.01 (1 point) and evaluation <= 10 % of round time",
            "passed": abs(difference) <= 0.01 and eval_share <= 0.10,
        },
    )
