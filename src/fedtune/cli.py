"""The ``fedtune`` command line.

    fedtune run [CONFIG.yaml] [key=value ...] --out DIR [--overwrite | --resume]
    fedtune methods
    fedtune datasets
    fedtune analyze RUN_DIR [--against RUN_DIR2] [--out DIR]
    fedtune eval RUN_DIR --tasks piqa arc-e gsm8k ... [--max-examples N]
    fedtune multitask [CONFIG.yaml] [key=value ...] --out DIR [--overwrite]
    fedtune flower simulate|app|tls|gateway|node-key ...   (see runtime/flower/commands.py)
    fedtune study STUDY --out DIR [--size cpu|gpu] [--seeds ...] [--report docs/results]

Exit codes: 0 success, 2 invalid input (one line on stderr), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fedtune.console import format_summary, quiet_libraries, split_config_and_overrides
from fedtune.errors import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as a UsageError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune.config import load_config
    from fedtune.data.federated import plan_partitions
    from fedtune.rundir import RunDir, check_run_dir

    config_path, overrides = split_config_and_overrides(args.items)
    if args.dtype:
        overrides.append(f"wire_dtype={args.dtype}")
    out = Path(args.out)
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume continues a run and --overwrite replaces it: give one of them")
        # without a config file, the run's own config (plus any overrides, e.g. rounds=20)
        config = load_config(config_path or (out / "config.yaml" if (out / "config.yaml").is_file() else None), overrides)
        RunDir.resume(out, config)  # refuses a changed config before anything loads
    else:
        config = load_config(config_path, overrides)
        check_run_dir(out, args.overwrite)
    from fedtune.tracking import check_backends

    check_backends(config.tracking)
    plan = plan_partitions(config)  # bad data input fails here, before any model loads

    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.simulator import Simulator

    fed = build_federation(config, plan)  # every check of the config against the model and method
    run_dir = RunDir(out) if args.resume else RunDir.create(out, args.overwrite)
    try:
        summary = Simulator(fed, run_dir).run(resume=args.resume)
    except BaseException:
        run_dir.restore()  # a run that fails before its first round gives back the run it replaced
        raise
    print(format_summary(summary, out))
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    from fedtune.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name in sorted(METHODS):
        print(f"{name:<{width}}  {METHODS[name].summary}")
    print(
        "\nWith any method that averages (see README, Methods):\n"
        "  server_opt.name=fedavgm|fedadam|fedyogi|fedadagrad  a server optimiser on the averaged tensors\n"
        "  fedprox.mu=MU                                       FedProx's proximal term in local training\n"
        "  scaffold.enabled=true                               SCAFFOLD's control variates (mean-aggregating methods)\n"
        "  scaffold.control=mean-gradient|option-ii            how a client estimates its control (default mean-gradient)"
    )
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedtune.data.sources import BUILTINS, resolve_data_dir

    root = resolve_data_dir(None)
    width = max(len(n) for n in BUILTINS)
    for name, spec in BUILTINS.items():
        local = root is not None and all((root / f).exists() for f in spec.local_files)
        where = "local" if local else "hub"
        print(f"{name:<{width}}  [{where}]  {spec.description}")
    print("\nAlso: a local .jsonl/.json/.csv/.parquet file, or any Hugging Face Hub dataset id.")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    """Subspace similarity and magnitude/direction change of a run's LoRA adapters."""
    from fedtune.analysis import analyze
    from fedtune.analysis.report import format_means, summarize, write_report

    for name in ("top_i", "top_j"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "analysis"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    analysis = analyze(run_dir, args.against, args.top_i, args.top_j, args.dw_side)
    write_report(analysis, out)
    print(format_means(summarize(analysis)))
    print(f"\nwritten to {out}")
    return EXIT_OK


def cmd_multitask(args: argparse.Namespace) -> int:
    """Centralised multi-task fine-tuning: ALoRA, HydraLoRA or plain LoRA over several tasks."""
    from fedtune.multitask.config import load_multitask_config
    from fedtune.multitask.data import load_task_rows
    from fedtune.multitask.report import format_table
    from fedtune.multitask.train import prepare, run_multitask
    from fedtune.rundir import RunDir, check_run_dir

    config_path, overrides = split_config_and_overrides(args.items)
    config = load_multitask_config(config_path, overrides)
    out = Path(args.out)
    check_run_dir(out, args.overwrite)
    rows = load_task_rows(config)  # bad data input fails here, before any model loads
    job = prepare(config, rows)
    run_dir = RunDir.create(out, args.overwrite)
    summary = run_multitask(job, run_dir)
    print(format_table(summary, out))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a finished run's base, global and personal models on built-in tasks."""
    from fedtune.scoring import score_run

    run_dir = Path(args.run_dir)
    print(score_run(run_dir, list(dict.fromkeys(args.tasks)), args.max_examples, args.device, args.data_dir), end="")
    print(f"written to {run_dir / 'eval'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedtune", description="Federated fine-tuning of large language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a federated fine-tuning job in the embedded simulator")
    run.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value", help="a config file and/or overrides")
    run.add_argument("--out", required=True, help="run directory to write")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument(
        "--resume", action="store_true", help="continue a stopped run in --out from its last checkpoint (more rounds= allowed)"
    )
    run.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="precision of what goes on the wire (wire_dtype)"
    )
    run.set_defaults(func=cmd_run)
    sub.add_parser("methods", help="list the federated methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", help="list the built-in datasets").set_defaults(func=cmd_datasets)
    analyze = sub.add_parser("analyze", help="subspace similarity and weight change of a run's LoRA adapters")
    analyze.add_argument("run_dir", metavar="RUN_DIR", help="a finished LoRA run directory")
    analyze.add_argument("--against", metavar="RUN_DIR2", help="also compare with this run's adapters (same modules)")
    analyze.add_argument("--out", help="where to write the analysis (default: RUN_DIR/analysis)")
    analyze.add_argument("--top-i", type=int, help="singular vectors kept on the left of each pair (default: full rank)")
    analyze.add_argument("--top-j", type=int, help="singular vectors kept on the right of each pair (default: full rank)")
    analyze.add_argument("--dw-side", choices=("column", "row"), default="column", help="compare ΔW's column or row spaces")
    analyze.set_defaults(func=cmd_analyze)
    scoring = sub.add_parser("eval", help="score a finished run's models on built-in tasks (RUN_DIR/eval)")
    scoring.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    scoring.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="built-in tasks (see fedtune datasets)")
    scoring.add_argument("--max-examples", type=int, help="score at most N test examples per task (a seeded sample)")
    scoring.add_argument("--data-dir", help="where the tasks' local copies are (default: the run's data_dir, FEDTUNE_DATA_DIR)")
    scoring.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to evaluate")
    scoring.set_defaults(func=cmd_eval)
    multitask = sub.add_parser("multitask", help="centralised multi-task fine-tuning: ALoRA, HydraLoRA or LoRA")
    multitask.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value", help="a config file and/or overrides")
    multitask.add_argument("--out", required=True, help="run directory to write")
    multitask.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    multitask.set_defaults(func=cmd_multitask)
    from fedtune.runtime.flower.commands import add_flower_commands
    from fedtune.studies.command import add_study_command

    add_flower_commands(sub, _Parser)
    add_study_command(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, except that key=value overrides may also come after the options
    (``fedtune compare FILE --out DIR rounds=2``), where plain argparse refuses them."""
    args, rest = parser.parse_known_args(argv)
    target = next((name for name in ("items", "overrides") if isinstance(getattr(args, name, None), list)), None)
    stray = [item for item in rest if item.startswith("-") or "=" not in item or target is None]
    if stray:
        raise UsageError(f"{parser.prog}: unrecognized arguments: {' '.join(stray)}")
    if target is not None:
        getattr(args, target).extend(rest)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    try:
        args = parse(build_parser(), argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that say how to reproduce them
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # a runtime failure: one line, the traceback on request
        if os.environ.get("FEDTUNE_DEBUG"):
            traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"fedtune: failed: {type(err).__name__}: {first} (set FEDTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
