"""`fedtune compare`: methods on the user's own data, paired statistics, costs, Pareto view."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from conftest import write_classification_jsonl

from fedtune.cli import main
from fedtune.studies.report import paired_difference, pareto_front

TINY = {
    "model": "tiny-bert", "clients": 4, "rounds": 2, "local_steps": 2, "batch_size": 4, "max_seq_len": 32,
    "partition": "iid", "lr": 0.01, "lora": {"r": 4}, "threads": 1, "device": "cpu", "precision": "fp32",
}  # fmt: skip


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A user's own data and run config."""
    data = write_classification_jsonl(tmp_path / "reviews.jsonl")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**TINY, "dataset": str(data)}))
    return config


def comparison_file(tmp_path: Path, job: Path, **changes: object) -> Path:
    doc = {
        "base": job.name,  # found beside the comparison file
        "seeds": [0, 1],
        "reference": "FedIT",
        "variants": {
            "FedIT": {"method": "fedit"},
            "FFA-LoRA": {"method": "ffa-lora"},
            "Fed-ALoRA keep": {"method": "fed-alora", "fed_alora.a_persistence": "keep"},
        },
        "claims": ["sharing B is enough"],
        **changes,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_compare_file_end_to_end(tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compare", str(comparison_file(tmp_path, job)), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v, s) for v in ("FedIT", "FFA-LoRA", "Fed-ALoRA keep") for s in "01")
    report = (out / "report.md").read_text()
    assert "### Paired differences against `FedIT`" in report
    for variant in ("FFA-LoRA", "Fed-ALoRA keep"):
        line = next(x for x in report.splitlines() if x.startswith(f"| {variant} | 2 |"))
        assert any(v in line for v in ("better", "worse", "not distinguishable at 2 seeds"))
    assert "personal_accuracy" in report  # Fed-ALoRA has local parts
    assert "downlink / run (MiB)" in report and "client training memory (MiB)" in report
    assert "Not beaten on both final accuracy and uplink per run:" in report
    assert "Reproduce: `fedtune compare" in report and "sharing B is enough" in report
    for plot in ("main_accuracy_vs_round", "main_accuracy_vs_uplink", "main_accuracy_vs_total_bytes_up"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0
    # the uplink ranking the report states is the bytes the runs really sent
    up = {r["variant"]: int(r["total_bytes_up"]) for r in rows}
    assert up["FFA-LoRA"] < up["FedIT"]
    stamp = (out / "runs" / "main" / "fedit" / "seed0" / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(comparison_file(tmp_path, job)), "--out", str(out)]) == 0  # resumed: reused
    assert (out / "runs" / "main" / "fedit" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_quick_form_and_overrides_for_every_run(tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick"
    assert main(["compare", str(job), "--methods", "fedit", "fedsa-lora", "--seeds", "0", "1", "--out", str(out), "rounds=1"]) == 0
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"fedit", "fedsa-lora"} and len(rows) == 4
    assert all(yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["rounds"] == 1 for r in rows)
    assert "### Paired differences against `fedit`" in (out / "report.md").read_text()


# case -> (changes to the comparison file, words the one-line error must contain)
BAD = {
    "unknown method": ({"variants": {"FedIT": {"method": "fedit"}, "Mine": {"method": "fedbogus"}}}, "variant 'Mine'"),
    "unknown key": ({"variants": {"FedIT": {"method": "fedit"}, "Typo": {"method": "fedit", "lrr": 0.1}}}, "variant 'Typo'"),
    "missing base": ({"base": "no-such.yaml"}, "base config file not found: no-such.yaml"),
    "reference not a variant": ({"reference": "FedAvg"}, "reference 'FedAvg' is not a variant"),
    "variant not a mapping": ({"variants": {"FedIT": "fedit"}}, "variant 'FedIT' must be a mapping"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_comparison_files_are_refused_before_any_run(tmp_path: Path, job: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    changes, words = BAD[case]
    out = tmp_path / "out"
    assert main(["compare", str(comparison_file(tmp_path, job, **changes)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_duplicate_variant_names_are_refused(tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(f"base: {job}\nvariants:\n  FedIT: {{method: fedit}}\n  FedIT: {{method: ffa-lora}}\n")
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'FedIT' appears twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_paired_difference_matches_a_hand_computed_t_interval() -> None:
    reference = {0: 0.50, 1: 0.40, 2: 0.60}
    variant = {0: 0.55, 1: 0.47, 2: 0.63, 9: 0.99}  # seed 9 has no partner: not used
    # differences 0.05, 0.07, 0.03: mean 0.05, sd 0.02, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.02 / math.sqrt(3)
    paired = paired_difference(variant, reference, lower_better=False)
    assert paired is not None and paired.seeds == 3
    assert paired.mean == pytest.approx(0.05) and paired.low == pytest.approx(0.05 - half, abs=1e-6)
    assert paired.high == pytest.approx(0.05 + half, abs=1e-6) and paired.verdict == "better"
    assert paired_difference(variant, reference, lower_better=True).verdict == "worse"  # a loss that went up
    noisy = paired_difference({0: 0.6, 1: 0.3, 2: 0.55}, reference, lower_better=False)
    assert noisy is not None and noisy.verdict == "not distinguishable at 3 seeds"
    assert paired_difference({5: 0.1}, reference, lower_better=False) is None


def test_pareto_front_keeps_only_the_undominated() -> None:
    points = {"cheap": (0.30, 1.0), "best": (0.40, 5.0), "dominated": (0.29, 2.0), "tie": (0.40, 5.0)}
    assert pareto_front(points, lower_better=False) == {"cheap", "best", "tie"}
    assert pareto_front({"a": (2.0, 1.0), "b": (1.5, 3.0)}, lower_better=True) == {"a", "b"}
