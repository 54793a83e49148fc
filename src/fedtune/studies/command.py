"""``fedtune study STUDY --out DIR [--size cpu|gpu] [--seeds 0 1 2] [--settings NAME ...] [--jobs N] [--finished-only] [--report docs/results]``."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any


def cmd_study(args: argparse.Namespace) -> int:
    from fedtune.errors import UsageError
    from fedtune.studies.report import write_report
    from fedtune.studies.runner import run_study, study_named, unfinished_runs, write_csv

    study = study_named(args.study)
    if len(args.seeds) < 1:
        raise UsageError("--seeds needs at least one seed")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    skipped: list[str] = []
    if args.settings:
        known = [s.name for s in study.settings]
        unknown = [name for name in args.settings if name not in known]
        if unknown:
            raise UsageError(f"study {study.name} has no setting {unknown[0]!r} (it has {', '.join(known)})")
        skipped = [name for name in known if name not in args.settings]
        study = dataclasses.replace(study, settings=tuple(s for s in study.settings if s.name in args.settings))
    out, report_dir = Path(args.out), Path(args.report)
    for flag, path in (("--out", out), ("--report", report_dir)):
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a directory")
    start = time.perf_counter()
    missing = unfinished_runs(study, out, args.size, args.seeds) if args.finished_only else []
    rows = run_study(study, out, args.size, args.seeds, args.jobs, finished_only=args.finished_only)
    if not rows:
        raise UsageError(f"no finished runs of study {study.name} (size {args.size}) under {out}")
    wall = sum(float(r["wall_seconds"]) for r in rows)
    write_csv(rows, report_dir / f"{study.name}.csv")
    # what reproduces the runs: the invocation without --finished-only (which runs nothing)
    argv = [a for a in sys.argv[1:] if a != "--finished-only"]
    command = "fedtune " + " ".join(shlex.quote(a) for a in argv) if argv[:1] == ["study"] else f"fedtune study {study.name}"
    report = write_report(study, rows, report_dir, args.size, args.seeds, wall, command, skipped, missing)
    print(f"{len(rows)} runs in {(time.perf_counter() - start) / 60:.1f} min; report: {report}")
    return 0


def add_study_command(sub: Any) -> None:
    from fedtune.studies.definitions import STUDIES

    study = sub.add_parser("study", help="run a study (methods x seeds) and write its report")
    study.add_argument("study", choices=sorted(STUDIES))
    study.add_argument("--out", required=True, help="where the study's run directories go")
    study.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument("--settings", nargs="+", default=None, help="run only these settings of the study")
    study.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    study.add_argument(
        "--finished-only", action="store_true", help="run nothing: report the runs already finished, and list the missing ones"
    )
    study.add_argument("--report", default="docs/results", help="folder for <study>.md, its CSV and plots")
    study.set_defaults(func=cmd_study)
