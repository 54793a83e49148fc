"""precision=auto against fp32 on the default job: final accuracy at 2 seeds, and the share of
each round spent evaluating (target: accuracy within 1 point, evaluation <= 10 % of a round)."""

from __future__ import annotations

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
    return {
        "precision_used": summary["precision"],
        "final_accuracy": summary["final"]["accuracy"],
        "final_personal_accuracy": summary["final"].get("personal_accuracy"),
        "round_seconds": sum(r["seconds"] for r in rows) / len(rows),
        "train_seconds": sum(r["train_seconds"] for r in rows) / len(rows),
        "eval_seconds": sum(r["eval_seconds"] for r in rows) / len(rows),
        "eval_share": sum(r["eval_seconds"] for r in rows) / sum(r["seconds"] for r in rows),
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
            "= eval seconds / round seconds (global + personalised evaluation every round)",
            "runs": {p: {str(s): r for s, r in by_seed.items()} for p, by_seed in runs.items()},
            "mean_final_accuracy": mean,
            "accuracy_difference_auto_minus_fp32": difference,
            "max_eval_share_auto": eval_share,
            "target": "|difference| <= 0.01 (1 point) and evaluation <= 10 % of a round",
            "passed": abs(difference) <= 0.01 and eval_share <= 0.10,
        },
    )
