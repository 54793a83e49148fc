"""Built-in studies (comparison files in configs/studies/): grid of variants x seeds, resumable,
CSV + Markdown report + plots. The studies here are tiny files in a temporary study folder."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_classification_jsonl

from fedtune.cli import main
from fedtune.console import exit_when_orphaned
from fedtune.studies import comparison


def write_study(folder: Path, base: Path, variants: dict, notes: tuple = (), extra_settings: dict | None = None) -> Path:
    settings = {"tiny-setting": {"base": str(base), "sizes": {"cpu": {"lr": 0.01}, "gpu": {}}}, **(extra_settings or {})}
    doc = {"question": "Does the runner work?", "variants": variants, "settings": settings, "claims": ["the runner runs"], "notes": list(notes)}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def tiny_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A built-in study named ``tiny``: its file in a study folder the command reads."""
    dataset = write_classification_jsonl(tmp_path / "cls.jsonl")
    base = tmp_path / "base.yaml"
    base.write_text(
        f"model: tiny-bert\ndataset: {dataset}\nclients: 4\nrounds: 2\nlocal_steps: 2\nbatch_size: 4\n"
        "max_seq_len: 32\npartition: iid\nlora: {r: 4}\nthreads: 1\ndevice: cpu\nprecision: fp32\n"
    )
    folder = tmp_path / "studies"
    folder.mkdir()
    monkeypatch.setattr(comparison, "STUDY_DIR", folder)
    return write_study(folder, base, {"FedIT": {"method": "fedit"}, "Fed-ALoRA": {"method": "fed-alora"}})


def test_study_grid_report_and_resume(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "study", tmp_path / "docs"
    args = ["study", "tiny", "--out", str(out), "--seeds", "0", "1", "--report", str(report)]
    assert main(args) == 0
    with open(report / "tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted([("FedIT", "0"), ("FedIT", "1"), ("Fed-ALoRA", "0"), ("Fed-ALoRA", "1")])
    assert all(0.0 <= float(r["final"]) <= 1.0 for r in rows)
    text = (report / "tiny.md").read_text()
    assert "| FedIT | " in text and "| Fed-ALoRA | " in text and "± " in text and "Report written on:" in text
    assert "Runs' device and precision (from their summaries): cpu, fp32." in text
    assert (report / "tiny" / "tiny-setting_accuracy_vs_round.png").exists()
    assert (report / "tiny" / "tiny-setting_accuracy_vs_uplink.png").exists()
    summary = out / "tiny-setting" / "fedit" / "seed0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert main(args) == 0  # resumes: finished runs are reused, not rerun
    assert summary.stat().st_mtime_ns == stamp


def test_resume_reruns_a_run_whose_definition_changed(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "study", tmp_path / "docs"
    args = ["study", "tiny", "--out", str(out), "--seeds", "0", "--report", str(report)]
    assert main(args) == 0
    fedit, alora = (out / "tiny-setting" / name / "seed0" for name in ("fedit", "fed-alora"))
    alora_stamp = (alora / "summary.json").stat().st_mtime_ns
    base = Path(yaml.safe_load(tiny_study.read_text())["settings"]["tiny-setting"]["base"])
    write_study(tiny_study.parent, base, {"FedIT": {"method": "fedit", "lr": 0.05}, "Fed-ALoRA": {"method": "fed-alora"}}, ("lr chosen by a sweep",))
    assert main(args) == 0
    assert yaml.safe_load((fedit / "config.yaml").read_text())["lr"] == 0.05  # the stale lr=0.01 run was replaced
    assert (alora / "summary.json").stat().st_mtime_ns == alora_stamp  # the unchanged one was reused
    assert "config differs" in capsys.readouterr().err
    assert "- lr chosen by a sweep" in (report / "tiny.md").read_text()


def test_parallel_jobs_give_the_rows_of_a_sequential_study(tiny_study: Path, tmp_path: Path, capfd) -> None:
    def rows(name: str, jobs: str) -> list[dict[str, str]]:
        args = ["study", "tiny", "--out", str(tmp_path / name), "--seeds", "0", "1", "--jobs", jobs, "--report", str(tmp_path / name / "docs")]
        assert main(args) == 0
        with open(tmp_path / name / "docs" / "tiny.csv") as f:
            return list(csv.DictReader(f))

    sequential = rows("one", "1")
    capfd.readouterr()
    parallel = rows("two", "3")
    # the spawned workers print only what fedtune prints (their progress goes nowhere): no library notes
    worker_noise = [line for line in capfd.readouterr().err.splitlines() if "runs:" not in line and line.strip()]
    assert worker_noise == []
    assert [(r["variant"], r["seed"]) for r in parallel] == [(r["variant"], r["seed"]) for r in sequential]
    for a, b in zip(sequential, parallel):  # the tiny runs use one thread each, so the results are bit-identical
        assert (a["final"], a["total_bytes_up"], a["final_accuracy"]) == (b["final"], b["total_bytes_up"], b["final_accuracy"])
    assert float(parallel[0]["train_tokens_per_second"]) > 0


def test_finished_only_reports_what_is_done_and_runs_nothing(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "study", tmp_path / "docs"
    assert main(["study", "tiny", "--out", str(out), "--seeds", "0", "--report", str(report)]) == 0
    args = ["study", "tiny", "--out", str(out), "--seeds", "0", "1", "--finished-only", "--report", str(report)]
    assert main(args) == 0
    assert not (out / "tiny-setting" / "fedit" / "seed1").exists()  # nothing was run
    with open(report / "tiny.csv") as f:
        assert sorted((r["variant"], r["seed"]) for r in csv.DictReader(f)) == [("Fed-ALoRA", "0"), ("FedIT", "0")]
    text = (report / "tiny.md").read_text()
    assert "2 of 4 runs finished; not finished: tiny-setting / FedIT / seed 1; tiny-setting / Fed-ALoRA / seed 1." in text
    assert "| variant | runs | final accuracy |" in text and "| FedIT | 1 | " in text


def test_finished_only_with_nothing_finished_is_a_usage_error(tiny_study: Path, tmp_path: Path, capsys) -> None:
    assert main(["study", "tiny", "--out", str(tmp_path / "s"), "--finished-only", "--report", str(tmp_path / "docs")]) == 2
    assert "no finished runs of tiny" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()


def test_jobs_below_one_is_a_usage_error(tiny_study: Path, tmp_path: Path, capsys) -> None:
    assert main(["study", "tiny", "--out", str(tmp_path / "s"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_unknown_study_is_a_usage_error(capsys) -> None:
    assert main(["study", "nope", "--out", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_shipped_studies_resolve() -> None:
    """Every built-in study file validates at both sizes (every variant's config builds)."""
    from fedtune.studies.comparison import validate
    from fedtune.studies.definitions import studies

    shipped = studies()
    assert sorted(shipped) == ["beyond-lora", "hafl-20ng", "init-similarity", "multitask", "optimisers", "share-which"]
    for study in shipped.values():
        assert study.claims
        for size in ("cpu", "gpu"):
            validate(study, size, [])


def test_shipped_sweeps_resolve() -> None:
    """The learning-rate sweeps behind the studies are comparison files too."""
    from fedtune.studies.comparison import STUDY_DIR, load_comparison, validate

    sweeps = sorted((STUDY_DIR / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        study = load_comparison(path)
        validate(study, "default", [])
        assert study.seeds and all(seed not in (0, 1, 2, 3, 4) for seed in study.seeds)  # never a reported seed


def test_settings_filter_runs_only_the_named_setting(tiny_study: Path, tmp_path: Path, capsys) -> None:
    base = yaml.safe_load(tiny_study.read_text())["settings"]["tiny-setting"]["base"]
    other = {"other-setting": {"base": base, "sizes": {"cpu": {"lr": 0.01}, "gpu": {}}, "variants": {"FedIT": {"method": "fedit"}}}}
    write_study(tiny_study.parent, Path(base), {"FedIT": {"method": "fedit"}, "Fed-ALoRA": {"method": "fed-alora"}}, extra_settings=other)
    out, report = tmp_path / "study", tmp_path / "docs"
    assert main(["study", "tiny", "--out", str(out), "--seeds", "0", "--settings", "other-setting", "--report", str(report)]) == 0
    assert (out / "other-setting" / "fedit" / "seed0" / "summary.json").exists()
    assert not (out / "tiny-setting").exists()
    text = (report / "tiny.md").read_text()
    assert "## other-setting" in text and "## tiny-setting" not in text and "not run for it: setting tiny-setting." in text
    capsys.readouterr()
    assert main(["study", "tiny", "--out", str(out), "--settings", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no setting 'nope'" in err


def test_a_study_run_in_parts_by_variant(tiny_study: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "study", tmp_path / "docs"
    assert main(["study", "tiny", "--out", str(out), "--seeds", "0", "--variants", "Fed-ALoRA", "--report", str(report)]) == 0
    assert (report / "tiny" / "runs" / "tiny-setting" / "fed-alora" / "seed0" / "summary.json").exists()  # the record
    assert not (out / "tiny-setting" / "fedit").exists()
    assert "not run for it: variant FedIT." in (report / "tiny.md").read_text()
    # the whole study later, from the records: FedIT is the one run still missing
    assert main(["study", "tiny", "--out", str(tmp_path / "elsewhere"), "--seeds", "0", "--report", str(report), "--finished-only"]) == 0
    text = (report / "tiny.md").read_text()
    assert "1 of 2 runs finished; not finished: tiny-setting / FedIT / seed 0" in text
    capsys.readouterr()
    assert main(["study", "tiny", "--out", str(out), "--variants", "FedX"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no variant 'FedX'" in err


def test_round_plots_tick_whole_rounds(tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds are whole numbers: neither a run's plots nor a study's may tick them at 1.2, 1.4, ..."""
    from matplotlib.figure import Figure

    round_ticks: dict[str, list[float]] = {}
    save = Figure.savefig

    def record_round_ticks(figure: Figure, path: object, *args: object, **kwargs: object) -> None:
        axes = figure.axes[0]
        if axes.get_xlabel() == "round":
            figure.canvas.draw()
            name = Path(str(path)).name  # fedtune.atomic writes to ".<name>.<random>.tmp" first
            round_ticks[name[1:].rsplit(".", 2)[0] if name.endswith(".tmp") else name] = list(axes.get_xticks())
        save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record_round_ticks)
    out, report = tmp_path / "study", tmp_path / "docs"
    assert main(["study", "tiny", "--out", str(out), "--seeds", "0", "--report", str(report)]) == 0
    assert "tiny-setting_accuracy_vs_round.png" in round_ticks  # the study's plot
    assert "accuracy_vs_round.png" in round_ticks  # a run's own plot
    assert all(float(t).is_integer() for ticks in round_ticks.values() for t in ticks), round_ticks


ORPHAN_JOB = '''
import os, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from fedtune.console import worker_setup


def hold(_):
    print(os.getpid(), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=worker_setup, initargs=(1, os.getpid())) as pool:
        list(pool.map(hold, [0, 1]))
'''


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_study_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """`kill` on `fedtune study --jobs N` must not leave workers running queued runs with stale code."""
    script = tmp_path / "orphan_job.py"
    script.write_text(ORPHAN_JOB)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = not _alive(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone, "the worker outlived its killed parent"


def test_the_orphan_watch_fires_when_the_parent_is_not_ours() -> None:
    fired = threading.Event()
    exit_when_orphaned(os.getppid() + 10**6, interval=0.01, on_orphan=fired.set)  # not our parent: orphaned
    assert fired.wait(5)
