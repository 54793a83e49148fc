"""``fedtune compare`` and ``fedtune study``: one engine, a comparison file or a built-in study.

    fedtune compare FILE.yaml --out DIR [--size NAME] [--seeds ...] [--jobs N] [--finished-only] [--records DIR] [key=value ...]
    fedtune compare CONFIG.yaml --methods fedit ffa-lora fed-alora --seeds 0 1 2 --out DIR [key=value ...]
    fedtune study NAME --out DIR [--size cpu|gpu] [--seeds ...] [--settings ...] [--variants ...] [--jobs N] [--finished-only] [--report docs/results]

``compare`` writes ``DIR/report.md``, ``DIR/runs.csv`` and ``DIR/plots/``, its runs under
``DIR/runs/``; ``study`` keeps its runs under ``--out`` and writes ``<report>/<NAME>.md``, and
each finished run's record under ``<report>/<NAME>/runs/`` (``--records``; reused by the next
invocation, here or on another machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.errors import UsageError


def _command_line(args: argparse.Namespace) -> str:
    # what reproduces the runs: the invocation without --finished-only (which runs nothing)
    argv = [a for a in getattr(args, "argv", sys.argv[1:]) if a != "--finished-only"]
    return "fedtune " + " ".join(shlex.quote(a) for a in argv)


def _check_common(args: argparse.Namespace, *dirs: tuple[str, Path | None]) -> None:
    if args.seeds is not None and len(args.seeds) < 1:
        raise UsageError("--seeds needs at least one seed")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    for flag, path in dirs:
        if path is not None and path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a directory")


def _pick_settings(study: Any, names: list[str] | None) -> tuple[Any, list[str]]:
    if not names:
        return study, []
    known = [s.name for s in study.settings]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"{study.name} has no setting {unknown[0]!r} (it has {', '.join(known)})")
    skipped = [f"setting {name}" for name in known if name not in names]
    return dataclasses.replace(study, settings=tuple(s for s in study.settings if s.name in names)), skipped


def _pick_variants(study: Any, names: list[str] | None) -> tuple[Any, list[str]]:
    """Only the named variants (a study run in parts; the others' records are reported later)."""
    if not names:
        return study, []
    known = list(dict.fromkeys(label for s in study.settings for label in s.variants))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"{study.name} has no variant {unknown[0]!r} (it has {', '.join(known)})")
    settings = tuple(dataclasses.replace(s, variants={k: v for k, v in s.variants.items() if k in names}) for s in study.settings)
    settings = tuple(s for s in settings if s.variants)
    return dataclasses.replace(study, settings=settings), [f"variant {name}" for name in known if name not in names]


def _run_and_report(
    study: Any,
    runs: Path,
    report: Path,
    figures: Path,
    csv: Path,
    args: argparse.Namespace,
    size: str,
    extra: list[str],
    skipped: list[str],
    records: Path | None,
    other_studies: Path | None = None,
) -> int:
    """``records``: where the runs' records are kept and reused; ``other_studies``: a folder of
    other studies' records (``<folder>/<study>/runs/``) whose matching runs are adopted."""
    from fedtune.studies.comparison import validate
    from fedtune.studies.report import write_report
    from fedtune.studies.runner import adopt_records, grid, record_index, run_study, unfinished_runs, write_csv

    seeds = list(args.seeds) if args.seeds is not None else list(study.seeds)
    if args.seeds is not None:  # the seeds asked for, and no others
        study = dataclasses.replace(study, settings=tuple(dataclasses.replace(s, more_seeds={}) for s in study.settings))
    validate(study, size, extra)  # every variant's config, before any run starts
    start = time.perf_counter()
    if records is not None and other_studies is not None:
        adopted = adopt_records(grid(study, runs, size, seeds, extra, records), record_index([other_studies]))
        if adopted:
            print(f"{adopted} runs reused from other studies' records in {other_studies}")
    missing = unfinished_runs(study, runs, size, seeds, extra, records) if args.finished_only else []
    rows = run_study(study, runs, size, seeds, args.jobs, finished_only=args.finished_only, extra=extra, records=records)
    if not rows:
        raise UsageError(f"no finished runs of {study.name} (size {size}) under {runs}")
    wall = sum(float(r["wall_seconds"]) for r in rows)
    write_csv(rows, csv)
    command = _command_line(args)
    path = write_report(study, rows, report, size, seeds, wall, command, skipped, missing, figures=figures, csv_name=csv.name)
    print(f"{len(rows)} runs in {(time.perf_counter() - start) / 60:.1f} min; report: {path}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fedtune.studies.runner import study_named

    out, report_dir = Path(args.out), Path(args.report)
    study, skipped = _pick_settings(study_named(args.study), args.settings)
    study, skipped_variants = _pick_variants(study, args.variants)
    skipped += skipped_variants
    records = Path(args.records) if args.records else report_dir / study.name / "runs"
    _check_common(args, ("--out", out), ("--report", report_dir), ("--records", records))
    report = report_dir / f"{study.name}.md"
    return _run_and_report(
        study, out, report, report_dir / study.name, report_dir / f"{study.name}.csv", args, args.size, [], skipped, records, report_dir
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from fedtune.studies.comparison import is_comparison_file, load_comparison, quick_comparison
    from fedtune.studies.definitions import DEFAULT_SIZE

    source = Path(args.file)
    extra = [item for item in args.overrides if "=" in item]
    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise UsageError(f"unexpected argument {stray[0]!r}: give one file and key=value overrides")
    out = Path(args.out)
    records = Path(args.records) if args.records else None
    _check_common(args, ("--out", out), ("--records", records))
    if is_comparison_file(source):
        if args.methods:
            raise UsageError(f"{source} is a comparison file with its own variants; --methods is for a run config")
        study = load_comparison(source)
    else:
        study = quick_comparison(source, args.methods or [], list(args.seeds) if args.seeds is not None else [0, 1, 2])
    study, skipped = _pick_settings(study, args.settings)
    study, skipped_variants = _pick_variants(study, args.variants)
    skipped += skipped_variants
    size = args.size or (DEFAULT_SIZE if DEFAULT_SIZE in study.settings[0].overrides else next(iter(study.settings[0].overrides)))
    return _run_and_report(study, out / "runs", out / "report.md", out / "plots", out / "runs.csv", args, size, extra, skipped, records)


def add_study_command(sub: Any) -> None:
    from fedtune.studies.comparison import builtin_studies

    def common(parser: Any) -> None:
        parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the file's, or 0 1 2)")
        parser.add_argument("--settings", nargs="+", default=None, help="run only these settings")
        parser.add_argument("--variants", nargs="+", default=None, help="run only these variants (by label)")
        parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
        parser.add_argument(
            "--finished-only", action="store_true", help="run nothing: report the runs already finished, and list the missing ones"
        )
        parser.add_argument(
            "--records", default=None, help="keep each finished run's config, metrics and summary here, and reuse them "
            "(study: default <report>/<NAME>/runs)"
        )

    compare = sub.add_parser("compare", help="compare methods on your config: paired statistics, costs, Pareto view")
    compare.add_argument("file", metavar="FILE.yaml", help="a comparison file, or a run config with --methods")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    compare.add_argument("--out", required=True, help="where the runs, report.md, runs.csv and plots/ go")
    compare.add_argument("--methods", nargs="+", default=None, help="with a run config: one variant per method")
    compare.add_argument("--size", default=None, help="a named size of the comparison file")
    common(compare)
    compare.set_defaults(func=cmd_compare)

    study = sub.add_parser("study", help="run a built-in study (configs/studies/NAME.yaml) and write its report")
    study.add_argument("study", choices=sorted(builtin_studies()))
    study.add_argument("--out", required=True, help="where the study's run directories go")
    study.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    study.add_argument("--report", default="docs/results", help="folder for <study>.md, its CSV and plots")
    common(study)
    study.set_defaults(func=cmd_study)
