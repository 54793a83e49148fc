"""Run a comparison's grid (settings x variants x seeds) and collect one CSV row per run.

Runs go to ``RUNS/<setting>/<variant>/seed<k>/`` (ordinary run directories). A run whose
``summary.json`` exists is reused, so an interrupted study continues where it stopped,
but only when its stored config is the one the study asks for now: a run left from an
earlier definition (another learning rate, say) is run again rather than reported.

With ``records``, each finished run's record (its resolved config, ``metrics.jsonl`` and
``summary.json``: kilobytes, no adapters or checkpoints) is copied to
``RECORDS/<setting>/<variant>/seed<k>/``, and a record whose config matches is reused like a
finished run. The records are what a study keeps in the repository (``docs/results/<study>/runs/``),
so a later session, on another machine, continues the study instead of starting it over.

``jobs > 1`` runs that many runs at once, each in its own process: a small model leaves a
large GPU mostly idle, and separate processes keep one run's CPU-side work (data, kernel
launches) from stalling another's. Runs are independent and seeded, so the rows are the
same as one at a time, up to the floating-point effect of giving each process fewer threads.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm.auto import tqdm

from pydantic import BaseModel

from fedtune.atomic import write_text
from fedtune.config import dump_config
from fedtune.console import worker_setup
from fedtune.errors import UsageError
from fedtune.rundir import read_metrics
from fedtune.studies.definitions import Study
from fedtune.studies.kinds import KINDS


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def study_named(name: str) -> Study:
    from fedtune.studies.definitions import studies

    known = studies()
    try:
        return known[name]
    except KeyError:
        raise UsageError(f"unknown study {name!r}; studies: {', '.join(known)}") from None


def override_list(values: dict[str, object]) -> list[str]:
    """``{"lr": 0.01, "ranks": {4: 0.5}}`` -> ``["lr=0.01", "ranks={4: 0.5}"]``, each value
    written as YAML so that it reads back as exactly the same value (``"yes"`` stays a string)."""
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()
        out.append(f"{key}={text}")
    return out


def _key(config: BaseModel) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def config_key(config_text: str, kind: str = "federated") -> str:
    """What makes two runs the same run: the resolved config, read through today's schema, so
    that a setting added since (at a default that keeps the old behaviour) does not make a
    finished run look different."""
    return _key(KINDS[kind].schema.model_validate(yaml.safe_load(config_text)))


def _stored_key(run_dir: Path, kind: str = "federated") -> str | None:
    """The key of the run finished in ``run_dir`` (a run directory or a record), if any."""
    stored = run_dir / "config.yaml"
    if not (run_dir / "summary.json").exists() or not stored.exists():
        return None
    try:
        return _key(KINDS[kind].load(stored, []))
    except UsageError:  # a setting that no longer exists (or a run of another kind): not the same run
        return None


def reusable(out: Path, config_text: str, kind: str = "federated") -> bool:
    """A finished run made from this resolved config."""
    return _stored_key(out, kind) == config_key(config_text, kind)


#: what a run's record keeps: enough to report it and to tell whether it is still the run asked for
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


#: the analysis a record carries when its study analyses runs (``similarity_means``)
SIMILARITY_FILE = "similarity.json"


def save_record(run_dir: Path, record: Path) -> None:
    record.mkdir(parents=True, exist_ok=True)
    copied = (*RECORD_FILES[:-1], SIMILARITY_FILE, RECORD_FILES[-1])  # summary.json last: it marks the record done
    for name in copied:
        if (run_dir / name).exists():
            write_text(record / name, (run_dir / name).read_text(encoding="utf-8"))


def record_index(roots: list[Path]) -> dict[str, Path]:
    """Every finished federated record under ``roots`` (``<root>/<study>/runs/...``), by its config
    key, so that two studies asking for one run (the same FedIT at the same budget and seed) run it once."""
    index: dict[str, Path] = {}
    for root in roots:
        for summary in sorted(root.glob("*/runs/*/*/seed*/summary.json")):
            key = _stored_key(summary.parent)
            if key is not None:
                index.setdefault(key, summary.parent)
    return index


def adopt_records(todo: list[tuple[Any, Spec]], index: dict[str, Path]) -> int:
    """Copy a matching record from another study into each unfinished run's record place."""
    adopted = 0
    for _, spec in todo:
        base, overrides, _, record, kind = spec
        if record is None or kind != "federated" or _finished(spec):
            continue
        found = index.get(_key(KINDS[kind].load(base, overrides)))
        if found is not None and found != record:
            save_record(found, record)
            adopted += 1
    return adopted


@contextlib.contextmanager
def _held_alone(places: list[Path]) -> Iterator[None]:
    """An exclusive lock on each place for as long as its run runs.

    Two processes making the same run at once (one study launched twice, or two lanes sharing
    a records folder with overlapping variants) would interleave their rows in one
    ``metrics.jsonl``; the second is told instead. ``flock`` is released when its process
    dies, so a killed run leaves no stale lock. The lock files live in the temporary folder,
    named by the place's absolute path, so that none lands in a records folder kept in git."""
    folder = Path(tempfile.gettempdir()) / "fedtune-locks"
    folder.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        for place in places:
            name = hashlib.sha256(str(place.resolve()).encode()).hexdigest()[:32]
            handle = stack.enter_context(open(folder / f"{name}.lock", "a+"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{place} is being run by another fedtune process now; let it finish, or run other variants/seeds") from None
        yield


def run_one(base: Path | None, overrides: list[str], out: Path, record: Path | None = None, kind: str = "federated") -> dict[str, Any]:
    config = KINDS[kind].load(base, overrides)
    text = dump_config(config)
    if record is not None and reusable(record, text, kind):
        return json.loads((record / "summary.json").read_text())
    with _held_alone([out] if record is None else [out, record]):
        if record is not None and reusable(record, text, kind):  # the other process finished it meanwhile
            return json.loads((record / "summary.json").read_text())
        return _run_unlocked(config, text, out, record, kind)


def _run_unlocked(config: BaseModel, text: str, out: Path, record: Path | None, kind: str) -> dict[str, Any]:
    if not reusable(out, text, kind):
        if (out / "summary.json").exists():
            tqdm.write(f"{out}: its config differs from the comparison's now; running it again", file=sys.stderr)
        KINDS[kind].execute(config, out)
    if record is not None:
        save_record(out, record)
    return json.loads((out / "summary.json").read_text())


def similarity_means(run_dir: Path) -> dict[str, float]:
    """Mean A / B / dW subspace similarity over client pairs (``fedtune analyze``), kept in
    ``similarity.json`` so that a run's record carries it without the adapters it needs.

    The file also keeps the client x client grids of module-mean similarity (``clients``,
    ``grids``), from which the study's report draws its heatmaps; the returned row has the means only.
    """
    stored = run_dir / SIMILARITY_FILE
    if not stored.exists():  # a rerun replaces the whole run directory, this file with it
        write_text(stored, json.dumps(_similarity_of(run_dir)) + "\n")
    saved = json.loads(stored.read_text())
    return {key: value for key, value in saved.items() if key.startswith("similarity_")}


def _similarity_of(run_dir: Path) -> dict[str, Any]:
    from fedtune.analysis import analyze
    from fedtune.analysis.report import pair_matrix, summarize, write_report
    from fedtune.analysis.similarity import MATRICES

    analysis = analyze(run_dir)
    write_report(analysis, run_dir / "analysis")
    block = summarize(analysis)["similarity"].get("clients", {})
    clients = [c.label for c in analysis.run.clients]
    grids = {m: pair_matrix(analysis.similarity, "clients", m, clients, clients).tolist() for m in MATRICES}
    # NaN (a pair with nothing defined) is not JSON: null
    grids = {m: [[None if v != v else v for v in row] for row in grid] for m, grid in grids.items()}
    return {**{f"similarity_{m}": block.get(m) for m in MATRICES}, "clients": clients, "grids": grids}


def similarity_grids(record: Path) -> tuple[list[str], dict[str, list[list[float | None]]]] | None:
    """(client labels, matrix -> client x client grid) kept by ``similarity_means``, if any."""
    stored = record / SIMILARITY_FILE
    if not stored.exists():
        return None
    saved = json.loads(stored.read_text())
    return (saved["clients"], saved["grids"]) if "grids" in saved else None


def _run_in_worker(job: Spec) -> dict[str, Any]:
    return run_one(*job)


Spec = tuple[Path | None, list[str], Path, Path | None, str]  # (base config, overrides, run directory, record directory, kind)


def grid(
    study: Study, runs: Path, size: str, seeds: list[int], extra: list[str] = (), records: Path | None = None
) -> list[tuple[tuple[Any, str, int], Spec]]:
    """((setting, variant label, seed), (base config, overrides, run directory, record directory))
    for every run, with each variant's ``more_seeds`` after ``seeds``. ``extra`` (the command
    line's key=value) applies over everything else."""
    out = []
    for setting in study.settings:
        for label, variant in setting.variants.items():
            for seed in [*seeds, *(s for s in setting.more_seeds.get(label, ()) if s not in seeds)]:
                overrides = override_list({**setting.overrides[size], **variant, "seed": seed, "progress": False}) + list(extra)
                where = Path(setting.name) / slug(label) / f"seed{seed}"
                spec = (setting.base_path, overrides, runs / where, records / where if records else None, study.kind)
                out.append(((setting, label, seed), spec))
    return out


def _finished(spec: Spec) -> bool:
    base, overrides, run_dir, record, kind = spec
    text = dump_config(KINDS[kind].load(base, overrides))
    return reusable(run_dir, text, kind) or (record is not None and reusable(record, text, kind))


def _reported_dir(spec: Spec) -> Path:
    """Where a finished run's metrics are read: its record when there is one (the run
    directory may be on another machine), else its run directory."""
    _, _, run_dir, record, _ = spec
    return record if record is not None and (record / "summary.json").exists() else run_dir


def unfinished_runs(study: Study, runs: Path, size: str, seeds: list[int], extra: list[str] = (), records: Path | None = None) -> list[str]:
    """'setting / variant / seed k' of every run of the grid not finished with its current config."""
    todo = grid(study, runs, size, seeds, extra, records)
    return [f"{s.name} / {label} / seed {seed}" for (s, label, seed), spec in todo if not _finished(spec)]


def run_study(
    study: Study,
    runs: Path,
    size: str,
    seeds: list[int],
    jobs: int = 1,
    finished_only: bool = False,
    extra: list[str] = (),
    records: Path | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse) every run of the grid; ``finished_only`` runs nothing and collects the finished ones."""
    todo = grid(study, runs, size, seeds, extra, records)
    if finished_only:
        todo = [(key, spec) for key, spec in todo if _finished(spec)]
        if not todo:
            return []
    specs = [spec for _, spec in todo]
    with tqdm(total=len(specs), desc=f"{study.name} runs") as bar:  # closed before an error is printed
        summaries = []
        if jobs > 1:
            # spawn, not fork: a forked child of a process that touched CUDA cannot use it
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=worker_setup, initargs=(threads, os.getpid())) as pool:
                for summary in pool.map(_run_in_worker, specs):
                    summaries.append(summary)
                    bar.update(1)
        else:
            for spec in specs:
                summaries.append(run_one(*spec))
                bar.update(1)
    return [_row(study, setting, label, seed, spec, summary) for ((setting, label, seed), spec), summary in zip(todo, summaries)]


def _row(study: Study, setting: Any, label: str, seed: int, spec: Spec, summary: dict[str, Any]) -> dict[str, Any]:
    run_dir = _reported_dir(spec)
    history = read_metrics(run_dir)
    row: dict[str, Any] = {"setting": setting.name, "variant": label, "seed": seed, "run_dir": str(run_dir)}
    row.update(KINDS[study.kind].row(summary, history, study.metric, study.reach))
    for extra in study.extra_metrics:
        values = [r[extra] for r in history if extra in r]
        row[extra] = max(values) if extra.endswith("_bytes") else (values[-1] if values else None)
    if study.analyze:  # needs the adapters: the record's stored result, else the run directory of this very run
        here, record = spec[2], spec[3]
        if record is not None and (record / SIMILARITY_FILE).exists():
            source = record
        elif (here / "summary.json").exists() and _stored_key(here, study.kind) == _stored_key(run_dir, study.kind):
            source = here
        else:
            raise UsageError(f"{run_dir} has no {SIMILARITY_FILE} and its adapters are not here: run it again (remove the record)")
        row.update(similarity_means(source))
        if record is not None and not (record / SIMILARITY_FILE).exists():
            write_text(record / SIMILARITY_FILE, (source / SIMILARITY_FILE).read_text(encoding="utf-8"))  # the record carries it too
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return path
