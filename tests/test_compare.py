"""`fedtune compare`: methods on the user's own data, paired statistics, costs, Pareto view."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
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
        "claims": [
            "sharing B is enough",
            {"text": "FFA-LoRA learns as well", "variant": "FFA-LoRA", "expect": "not-worse", "source": "seed 001"},
            {"text": "keeping A beats the floor", "variant": "Fed-ALoRA keep", "against": "majority-class floor", "metric": "personal_accuracy"},
        ],
        **changes,
    }
    if "variants" in changes and "claims" not in changes:  # the claims name the default variants
        doc["claims"] = ["sharing B is enough"]
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_compare_file_end_to_end(tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compare", str(comparison_file(tmp_path, job, reach=0.3)), "--out", str(out)]) == 0
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
    assert "Majority-class floor" in report
    # each claim's verdict, re-derived here from the runs' final scores: paired by seed, Student's t
    with open(out / "report-claims.csv") as f:
        claims = {c["claim"]: c for c in csv.DictReader(f)}
    final = {(r["variant"], int(r["seed"])): r for r in rows}
    expected = {
        "FFA-LoRA learns as well": [float(final["FFA-LoRA", s]["final"]) - float(final["FedIT", s]["final"]) for s in (0, 1)],
        "keeping A beats the floor": [
            float(final["Fed-ALoRA keep", s]["final_personal_accuracy"]) - float(final["Fed-ALoRA keep", s]["personal_majority_class_accuracy"])
            for s in (0, 1)
        ],
    }
    assert set(claims) == set(expected)
    for text, diffs in expected.items():
        mean = sum(diffs) / 2
        half = 12.706204736 * abs(diffs[0] - diffs[1]) / 2  # t(0.975, 1) * stdev / sqrt(2), stdev of 2 = |a - b| / sqrt(2)
        assert float(claims[text]["mean"]) == pytest.approx(mean, abs=1e-12)
        if half > 0:
            assert float(claims[text]["low"]) == pytest.approx(mean - half, abs=1e-9)
            assert float(claims[text]["high"]) == pytest.approx(mean + half, abs=1e-9)
        held = mean - half > 0
        worse = mean + half < 0
        assert claims[text]["verdict"] == ("held" if held else "not held" if worse else "not distinguishable at 2 seeds")
        assert f"| {text} |" in report
    for plot in ("main_accuracy_vs_round", "main_accuracy_vs_uplink", "main_accuracy_vs_total_bytes_up"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0
    # uplink to reach accuracy 0.3: the cumulative uplink of the first evaluated round at or above it
    for r in rows:
        history = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        first = next((h["cumulative_bytes_up"] for h in history if h.get("accuracy") is not None and h["accuracy"] >= 0.3), None)
        assert (r["bytes_up_to_reach"] or None) == (str(first) if first is not None else None)
    assert "uplink to accuracy ≥ 0.3 (MiB)" in report
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


def test_records_let_a_later_session_continue_without_the_run_directories(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from fedtune.studies.runner import RECORD_FILES

    records, first = tmp_path / "records", tmp_path / "first"
    one_seed = comparison_file(tmp_path, job, seeds=[0])
    assert main(["compare", str(one_seed), "--out", str(first), "--records", str(records)]) == 0
    record = records / "main" / "fedit" / "seed0"
    assert sorted(p.name for p in record.iterdir()) == sorted(RECORD_FILES)  # no adapters, no checkpoints
    assert (first / "runs" / "main" / "fedit" / "seed0" / "adapter").is_dir()
    report_before = (first / "report.md").read_text()
    shutil.rmtree(first)  # another session, another machine: only the committed records are left
    stamp = (record / "summary.json").stat().st_mtime_ns

    second = tmp_path / "second"
    two_seeds = comparison_file(tmp_path, job, seeds=[0, 1])
    assert main(["compare", str(two_seeds), "--out", str(second), "--records", str(records)]) == 0
    assert not (second / "runs" / "main" / "fedit" / "seed0").exists()  # seed 0 came from its record
    assert (second / "runs" / "main" / "fedit" / "seed1" / "summary.json").exists()  # seed 1 was run
    assert (record / "summary.json").stat().st_mtime_ns == stamp
    assert (records / "main" / "fedit" / "seed1" / "summary.json").exists()
    with open(second / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(Path(r["run_dir"]).is_relative_to(records) for r in rows)

    # the seed-0 rows are the first session's numbers: one seed's report, rebuilt from the records alone
    third = ["compare", str(two_seeds), "--seeds", "0", "--out", str(tmp_path / "third"), "--records", str(records), "--finished-only"]
    assert main(third) == 0
    table = [line for line in (tmp_path / "third" / "report.md").read_text().splitlines() if line.startswith("| FedIT |")]
    assert table and table[0] in report_before

    # a record from another definition (another learning rate) is not reported as this one's
    assert main(["compare", str(two_seeds), "--out", str(tmp_path / "fourth"), "--records", str(records), "--finished-only", "lr=0.02"]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_run_two_studies_share_is_run_once(tmp_path: Path, job: Path) -> None:
    from fedtune.studies.comparison import load_comparison
    from fedtune.studies.runner import adopt_records, grid, record_index, run_study

    pool = tmp_path / "results"
    first = load_comparison(comparison_file(tmp_path, job, seeds=[0], variants={"FedIT": {"method": "fedit"}}, claims=[]))
    run_study(first, tmp_path / "a-runs", "default", [0], records=pool / "a" / "runs")
    other = comparison_file(tmp_path, job, seeds=[0], variants={"FedIT": {"method": "fedit"}, "Local": {"method": "local-only"}}, claims=[])
    second = load_comparison(other)
    todo = grid(second, tmp_path / "b-runs", "default", [0], records=pool / "b" / "runs")
    assert adopt_records(todo, record_index([pool])) == 1  # FedIT, the same resolved config; not local-only
    adopted = pool / "b" / "runs" / "main" / "fedit" / "seed0"
    assert (adopted / "metrics.jsonl").read_text() == (pool / "a" / "runs" / "main" / "fedit" / "seed0" / "metrics.jsonl").read_text()
    rows = run_study(second, tmp_path / "b-runs", "default", [0], records=pool / "b" / "runs")
    assert not (tmp_path / "b-runs" / "main" / "fedit").exists() and (tmp_path / "b-runs" / "main" / "local" / "seed0" / "summary.json").exists()
    assert {r["variant"] for r in rows} == {"FedIT", "Local"}
    # another learning rate is another run
    changed = grid(second, tmp_path / "c-runs", "default", [0], extra=["lr=0.02"], records=pool / "c" / "runs")
    assert adopt_records(changed, record_index([pool])) == 0


def test_claims_of_variants_not_run_yet_say_so(tmp_path: Path, job: Path) -> None:
    from fedtune.studies.comparison import load_comparison
    from fedtune.studies.report import claim_verdicts

    study = load_comparison(comparison_file(tmp_path, job))
    rows = [
        {"setting": "main", "variant": "FedIT", "seed": 0, "primary_metric": "accuracy", "final": 0.50},
        {"setting": "main", "variant": "FedIT", "seed": 1, "primary_metric": "accuracy", "final": 0.40},
        {"setting": "main", "variant": "FFA-LoRA", "seed": 1, "primary_metric": "accuracy", "final": 0.55},
    ]
    verdicts = {v["claim"]: v for v in claim_verdicts(study, rows)}
    assert verdicts["keeping A beats the floor"]["verdict"] == "not run yet"  # no Fed-ALoRA keep run at all
    ffa = verdicts["FFA-LoRA learns as well"]
    assert (ffa["seeds"], ffa["verdict"]) == (1, "one seed: no interval") and ffa["mean"] == pytest.approx(0.15)


def test_claims_against_another_metric_or_setting_pair_the_same_seeds(tmp_path: Path, job: Path) -> None:
    """Seed 000's Figure 1 as claims: A more alike than B in the same runs; A less alike with
    different seeds than with one seed (the same variant and seed in another setting)."""
    from fedtune.studies.comparison import load_comparison
    from fedtune.studies.report import claim_verdicts

    claims = [
        {"text": "A more alike than B", "variant": "LoRA", "metric": "similarity_A", "against_metric": "similarity_B", "settings": ["same-seed"]},
        {"text": "seeds break A", "variant": "LoRA", "metric": "similarity_A", "settings": ["diff-seeds"], "against_setting": "same-seed", "expect": "worse"},
    ]
    settings = {"same-seed": {"overrides": {"lr": 0.01}}, "diff-seeds": {"overrides": {"lr": 0.02}}}
    study = load_comparison(comparison_file(tmp_path, job, variants={"LoRA": {"method": "local-only"}}, settings=settings, reference="LoRA", claims=claims))
    values = {  # (setting, seed) -> (similarity_A, similarity_B)
        ("same-seed", 0): (0.70, 0.10), ("same-seed", 1): (0.66, 0.12), ("same-seed", 2): (0.68, 0.05),
        ("diff-seeds", 0): (0.05, 0.11), ("diff-seeds", 1): (0.04, 0.09), ("diff-seeds", 2): (0.06, 0.10),
    }  # fmt: skip
    rows = [
        {"setting": st, "variant": "LoRA", "seed": seed, "primary_metric": "accuracy", "final": 0.5, "similarity_A": a, "similarity_B": b}
        for (st, seed), (a, b) in values.items()
    ]
    verdicts = {v["claim"]: v for v in claim_verdicts(study, rows)}
    assert set(verdicts) == {"A more alike than B", "seeds break A"}  # each only in the setting it names
    t = 4.302652729749464  # t(0.975, 2)
    expected = {
        "A more alike than B": [values["same-seed", s][0] - values["same-seed", s][1] for s in range(3)],
        "seeds break A": [values["diff-seeds", s][0] - values["same-seed", s][0] for s in range(3)],
    }
    for text, diffs in expected.items():
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        v = verdicts[text]
        assert v["mean"] == pytest.approx(mean, abs=1e-12) and v["seeds"] == 3
        assert (v["low"], v["high"]) == (pytest.approx(mean - t * sd / math.sqrt(3), abs=1e-9), pytest.approx(mean + t * sd / math.sqrt(3), abs=1e-9))
        assert v["verdict"] == "held"
    assert (verdicts["A more alike than B"]["against_metric"], verdicts["A more alike than B"]["against_setting"]) == ("similarity_B", "")
    assert (verdicts["seeds break A"]["against_metric"], verdicts["seeds break A"]["against_setting"]) == ("", "same-seed")
    # the setting compared against left out of this report (--settings): not run yet, not a crash
    alone = dataclasses.replace(study, settings=tuple(s for s in study.settings if s.name == "diff-seeds"))
    assert [v["verdict"] for v in claim_verdicts(alone, [r for r in rows if r["setting"] == "diff-seeds"])] == ["not run yet"]
    # a metric the runs do not have is named, not reported as runs still to make
    typo = load_comparison(comparison_file(tmp_path, job, variants={"LoRA": {"method": "local-only"}}, settings=settings, reference="LoRA",
                                           claims=[{"text": "t", "variant": "LoRA", "metric": "similarity_Z", "against_metric": "similarity_B"}]))  # fmt: skip
    assert {v["verdict"] for v in claim_verdicts(typo, rows)} == {"no similarity_Z in the runs"}


@pytest.mark.parametrize(
    ("metric", "lower"),
    [("accuracy", False), ("loss", True), ("personal_loss", True), ("lowrank_accuracy", False), ("mean_loss", True),
     ("mean_mc_accuracy", False), ("worst_loss", True), ("worst_accuracy", False), ("loss_open_qa", True),
     ("accuracy_sst2", False), ("spread_std", True), ("spread_range", True), ("similarity_A", False), ("perplexity", True)],
)  # fmt: skip
def test_which_way_each_metric_improves(metric: str, lower: bool) -> None:
    from fedtune.studies.kinds import lower_is_better

    assert lower_is_better(metric) is lower


def test_a_run_another_process_is_making_is_refused_not_made_twice(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two lanes sharing a records folder with an overlapping variant: the second is told, in one
    line, instead of interleaving a second run's rows into the same record."""
    from fedtune.studies.runner import _held_alone

    records, one_seed = tmp_path / "records", comparison_file(tmp_path, job, seeds=[0], variants={"FedIT": {"method": "fedit"}})
    record = records / "main" / "fedit" / "seed0"
    with _held_alone([record]):  # what the other process holds while it runs (flock: per open file, so in-process too)
        capsys.readouterr()
        assert main(["compare", str(one_seed), "--out", str(tmp_path / "second"), "--records", str(records)]) == 2
        err = capsys.readouterr().err
        [said] = [line for line in err.splitlines() if "fedtune" in line]
        assert said.startswith(f"fedtune: error: {record} is being run by another fedtune process")
        assert not (record / "summary.json").exists()
    assert main(["compare", str(one_seed), "--out", str(tmp_path / "third"), "--records", str(records)]) == 0
    assert [json.loads(line)["round"] for line in (record / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not [p for p in records.rglob("*") if p.name.endswith(".lock")]  # nothing for git to pick up


def test_an_analysed_comparison_keeps_the_client_grids_in_its_records(tmp_path: Path, job: Path) -> None:
    """``analyze: true``: every record carries the pair grids `fedtune analyze` computed (the
    run's analysis/similarity_mean.csv), and the report shows the seed-mean heatmaps."""
    doc = comparison_file(tmp_path, job, variants={"LoRA": {"method": "local-only"}}, reference="LoRA", analyze=True, seeds=[0])
    records, out = tmp_path / "records", tmp_path / "out"
    assert main(["compare", str(doc), "--out", str(out), "--records", str(records), "lora.init_seed_mode=per_client"]) == 0
    kept = json.loads((records / "main" / "lora" / "seed0" / "similarity.json").read_text())
    clients = kept["clients"]
    assert len(clients) == TINY["clients"]
    with open(out / "runs" / "main" / "lora" / "seed0" / "analysis" / "similarity_mean.csv") as f:
        pairs = [r for r in csv.DictReader(f) if r["kind"] == "clients"]
    assert len(pairs) == 3 * TINY["clients"] * (TINY["clients"] - 1) // 2
    for pair in pairs:
        i, j = clients.index(pair["left"]), clients.index(pair["right"])
        assert kept["grids"][pair["matrix"]][i][j] == kept["grids"][pair["matrix"]][j][i] == pytest.approx(float(pair["phi"]))
    for matrix in ("A", "B", "dW"):
        means = [float(p["phi"]) for p in pairs if p["matrix"] == matrix]
        assert kept[f"similarity_{matrix}"] == pytest.approx(sum(means) / len(means))
        assert [kept["grids"][matrix][k][k] for k in range(len(clients))] == [1.0] * len(clients)
    report = (out / "report.md").read_text()
    assert "![main_similarity_A](plots/main_similarity_A.png)" in report and (out / "plots" / "main_similarity_B.png").stat().st_size > 0
    with open(out / "runs.csv") as f:
        assert "grids" not in next(csv.DictReader(f))  # the CSV row has the means only


def test_an_analysed_study_draws_the_seed_mean_similarity_of_its_records(tmp_path: Path) -> None:
    from fedtune.studies.report import mean_similarity_grid, similarity_heatmaps

    clients = ["client0", "client1", "client2"]
    grids = [  # A per seed; pair (0, 2) undefined in seed 1 (a zero matrix), so its mean is seed 0's
        [[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]],
        [[1.0, 0.6, None], [0.6, 1.0, 0.5], [None, 0.5, 1.0]],
    ]
    rows = []
    for seed, grid in enumerate(grids):
        record = tmp_path / f"seed{seed}"
        record.mkdir()
        b = [[1.0 if i == j else 0.1 * (seed + 1) for j in range(3)] for i in range(3)]
        (record / "similarity.json").write_text(json.dumps({"similarity_A": 0.7, "clients": clients, "grids": {"A": grid, "B": b, "dW": b}}))
        rows.append({"run_dir": str(record)})
    labels, mean, seeds = mean_similarity_grid(rows, "A")
    assert (labels, seeds) == (clients, 2)
    assert mean.flatten().tolist() == pytest.approx([1.0, 0.7, 0.6, 0.7, 1.0, 0.6, 0.6, 0.6, 1.0])
    assert mean_similarity_grid(rows, "B")[1][0, 1] == pytest.approx(0.15)
    written = similarity_heatmaps(rows, tmp_path / "figures", "same-seed")
    assert [p.name for p in written] == ["same-seed_similarity_A.png", "same-seed_similarity_B.png"]
    assert all(p.stat().st_size > 0 for p in written)
    (tmp_path / "seed0" / "similarity.json").write_text(json.dumps({"similarity_A": 0.7}))  # a record from before grids
    (tmp_path / "seed1" / "similarity.json").unlink()
    assert mean_similarity_grid(rows, "A") is None and similarity_heatmaps(rows, tmp_path / "none", "x") == []


def test_a_multitask_comparison_pairs_mean_and_spread_over_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kind: multitask``: each run is a `fedtune multitask` run; its row is the mean score over
    tasks, each task's score and their spread, and a claim on the spread is re-derived here from
    the runs' own per-task scores (population std over tasks, paired by seed)."""
    tasks = [str(write_classification_jsonl(tmp_path / f"task{i}.jsonl", rows=40, labels=2 + i, seed=i)) for i in range(2)]
    base = tmp_path / "mt.yaml"
    base.write_text(yaml.safe_dump({
        "variant": "alora", "model": "tiny-bert", "tasks": tasks, "num_adapters": 2, "r": 4, "steps": 12, "batch_size": 4, "lr": 0.05,
        "max_seq_len": 32, "eval_every": 3, "eval_initial": True, "device": "cpu", "threads": 1, "precision": "fp32",
    }))  # fmt: skip
    doc = {
        "kind": "multitask", "base": base.name, "seeds": [0, 1], "reference": "LoRA",
        "variants": {"ALoRA": {}, "HydraLoRA": {"variant": "hydralora"}, "LoRA": {"variant": "lora", "num_adapters": None, "r": 8}},
        "claims": [{"text": "ALoRA is more balanced", "variant": "ALoRA", "against": "HydraLoRA", "metric": "spread_std"}],
    }  # fmt: skip
    path = tmp_path / "mt-compare.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out, records = tmp_path / "out", tmp_path / "records"
    assert main(["compare", str(path), "--out", str(out), "--records", str(records)]) == 0
    with open(out / "runs.csv") as f:
        rows = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert len(rows) == 6
    spread, untrained = {}, {}
    for (variant, seed), row in rows.items():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        scores = [summary["scores"][t] for t in tasks]
        mean = sum(scores) / 2
        assert row["primary_metric"] == "mean_accuracy" and float(row["final"]) == pytest.approx(mean)
        assert [float(row["final_accuracy_task0"]), float(row["final_accuracy_task1"])] == pytest.approx(scores)
        spread[variant, seed] = math.sqrt(sum((v - mean) ** 2 for v in scores) / 2)
        assert float(row["final_spread_std"]) == pytest.approx(spread[variant, seed])
        assert float(row["final_worst_accuracy"]) == pytest.approx(min(scores))
        assert summary["variant"] == {"ALoRA": "alora", "HydraLoRA": "hydralora", "LoRA": "lora"}[variant]
        # eval_initial: the untrained scores are a floor beside the table, not a candidate for the best mean
        history = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [0, 3, 6, 9, 12]
        assert float(row["best"]) == pytest.approx(max(h["mean"] for h in history[1:]))
        assert [float(row["untrained_task0"]), float(row["untrained_task1"])] == pytest.approx([history[0]["scores"][t] for t in tasks])
        untrained.setdefault(seed, set()).add((row["untrained_task0"], row["untrained_task1"]))
    with open(out / "report-claims.csv") as f:
        (claim,) = list(csv.DictReader(f))
    diffs = [spread["ALoRA", s] - spread["HydraLoRA", s] for s in (0, 1)]
    mean, half = sum(diffs) / 2, 12.706204736 * abs(diffs[0] - diffs[1]) / 2  # t(0.975, 1) * stdev / sqrt(2)
    assert float(claim["mean"]) == pytest.approx(mean, abs=1e-12)
    # a smaller spread is the better one: held when the whole interval is below zero
    assert claim["verdict"] == ("held" if mean + half < 0 else "not held" if mean - half > 0 else "not distinguishable at 2 seeds")
    report = (out / "report.md").read_text()
    assert "final mean_accuracy" in report and "accuracy_task0" in report and "spread_std" in report
    assert "uplink" not in report and "![main_mean_accuracy_vs_step](plots/main_mean_accuracy_vs_step.png)" in report
    assert "Majority-class floor per task" in report and all(0 < float(r["majority_task1"]) < 1 for r in rows.values())
    assert all(len(pairs) == 1 for pairs in untrained.values())  # every variant starts from the same base model
    assert "The untrained base model on the same rows" in report
    # a later session: the records alone rebuild the same rows, nothing is run again
    stamp = (records / "main" / "alora" / "seed0" / "summary.json").stat().st_mtime_ns
    again = tmp_path / "again"
    assert main(["compare", str(path), "--out", str(again), "--records", str(records)]) == 0
    assert not (again / "runs").exists() and (records / "main" / "alora" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    # a multi-task comparison compares the mean over tasks: another metric is refused in one line
    capsys.readouterr()
    for bad in ({"metric": "loss"}, {"analyze": True}):
        path.write_text(yaml.safe_dump({**doc, **bad}, sort_keys=False))
        assert main(["compare", str(path), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "takes no 'metric', 'reach' or 'analyze'" in err


def test_a_task_floor_is_one_value_per_seed_however_many_variants_ran() -> None:
    from fedtune.studies.report import _task_floor_lines

    floors = {0: 0.60, 1: 0.70}  # each seed draws its own test rows, so its own floor
    rows = [{"seed": seed, "majority_boolq": f, "untrained_boolq": f - 0.1} for seed, f in floors.items() for _ in range(3)]
    text = "\n".join(_task_floor_lines(rows))
    std = statistics.stdev(floors.values())  # over the 2 seeds, not over the 6 runs
    assert f"boolq 0.6500 ± {std:.4f}" in text and f"boolq 0.5500 ± {std:.4f}" in text, text


def test_more_seeds_run_only_for_the_variants_that_name_them(tmp_path: Path, job: Path) -> None:
    settings = {"main": {"more_seeds": {"FFA-LoRA": [0, 2]}}}  # seed 0 is already the file's
    path = comparison_file(tmp_path, job, seeds=[0], settings=settings, claims=[])
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        runs = sorted((r["variant"], r["seed"]) for r in csv.DictReader(f))
    assert runs == [("FFA-LoRA", "0"), ("FFA-LoRA", "2"), ("Fed-ALoRA keep", "0"), ("FedIT", "0")]
    assert "seeds [0] (FFA-LoRA in main also [2])" in (out / "report.md").read_text()
    # seeds asked for on the command line are those and no others
    assert main(["compare", str(path), "--out", str(out), "--seeds", "0", "--finished-only"]) == 0
    with open(out / "runs.csv") as f:
        assert sorted(r["seed"] for r in csv.DictReader(f)) == ["0", "0", "0"]


# case -> (changes to the comparison file, words the one-line error must contain)
BAD = {
    "more seeds for an unknown variant": ({"settings": {"main": {"more_seeds": {"FedX": [3]}}}}, "setting 'main': more_seeds names 'FedX', not a variant"),
    "unknown method": ({"variants": {"FedIT": {"method": "fedit"}, "Mine": {"method": "fedbogus"}}}, "variant 'Mine'"),
    "unknown key": ({"variants": {"FedIT": {"method": "fedit"}, "Typo": {"method": "fedit", "lrr": 0.1}}}, "variant 'Typo'"),
    "missing base": ({"base": "no-such.yaml"}, "base config file not found: no-such.yaml"),
    "reference not a variant": ({"reference": "FedAvg"}, "reference 'FedAvg' is not a variant"),
    "variant not a mapping": ({"variants": {"FedIT": "fedit"}}, "variant 'FedIT' must be a mapping"),
    "claim on an unknown variant": ({"claims": [{"text": "x wins", "variant": "FedX"}]}, "claim 'x wins': 'FedX' is not a variant"),
    "claim with a bad expectation": ({"claims": [{"text": "x", "variant": "FedIT", "expect": "sideways"}]}, "expect"),
    "claim against an unknown setting": ({"claims": [{"text": "y", "variant": "FedIT", "against_setting": "elsewhere"}]}, "claim 'y': no setting 'elsewhere'"),
    "claim against a metric of the other direction": ({"claims": [{"text": "w", "variant": "FedIT", "metric": "accuracy", "against_metric": "loss"}]}, "claim 'w': accuracy and loss do not improve in the same direction"),
    "claim against a metric without a variant": ({"claims": [{"text": "z", "against_metric": "loss"}]}, "claim 'z': 'against_metric' and 'against_setting' need a 'variant'"),
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


def test_uplink_pareto_view_leaves_out_a_one_client_ceiling(tmp_path: Path) -> None:
    from fedtune.studies.report import _pareto_lines

    def row(variant: str, clients: int, final: float, up: int, seed: int) -> dict:
        return {"variant": variant, "clients": clients, "final": final, "total_bytes_up": up, "client_train_state_bytes": 2**20, "seed": seed}

    rows = [row(v, c, f + 0.01 * s, up, s) for s in range(2) for v, c, f, up in (("ceiling", 1, 0.7, 2**18), ("fedit", 10, 0.5, 2**24), ("ffa", 10, 0.6, 2**23))]
    text = "\n".join(_pareto_lines(rows, "accuracy", tmp_path, "figs", "main"))
    assert "Left out of the uplink view: `ceiling`" in text
    assert "Not beaten on both final accuracy and uplink per run: `ffa`." in text  # the ceiling would have beaten both
    assert "Not beaten on both final accuracy and client training memory: `ceiling`." in text
    assert (tmp_path / "main_accuracy_vs_total_bytes_up.png").exists()
