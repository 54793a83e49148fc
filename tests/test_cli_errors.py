"""Bad input at the command line: exit 2, one line on stderr, and nothing already written lost."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_classification_jsonl

from fedtune.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    """A run directory some earlier job left, which a refused command must not touch."""
    out = tmp_path / "existing"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5}\n')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of an earlier run")
    return out


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "non_utf8_config": tmp_path / "latin1.yaml",
        "non_utf8_data": tmp_path / "latin1.jsonl",
        "broken_test_data": tmp_path / "broken.jsonl",
        "fake_gguf": tmp_path / "fake.gguf",
    }
    files["non_utf8_config"].write_bytes(b"method: fedit\nmodel: caf\xe9\n")
    files["non_utf8_data"].write_bytes(b'{"text": "caf\xe9", "label": 0}\n' * 20)
    files["broken_test_data"].write_text('{"text": "a", "label": 0}\n{not json\n')
    files["fake_gguf"].write_bytes(b"GGUF" + bytes(64))
    return files


# case -> (arguments after the tiny run overrides, words the one-line error must contain)
RUN_CASES = {
    "non-UTF-8 config": (["{non_utf8_config}"], "not UTF-8"),
    "non-UTF-8 dataset": (["dataset={non_utf8_data}"], "not UTF-8"),
    "malformed test_dataset": (["test_dataset={broken_test_data}"], "cannot read dataset file"),
    "fake .gguf": (["model={fake_gguf}"], "cannot load model"),
    "unknown target module": (["lora.target_modules=[nope]"], "target_modules"),
    "max_seq_len beyond the model": (["max_seq_len=2048"], "positions"),
    "rounds=true": (["rounds=true"], "not true/false"),
    "lr=.inf": (["lr=.inf"], "finite"),
    "rank above the hidden size": (["lora.r=64"], "exceeds the size"),
    "hetero rank above the hidden size": (["method=hetlora", "ranks=[2,4,4,64]"], "exceeds the size"),
    "DP with FlexLoRA": (["method=flexlora", "ranks=[2,4,4,8]", "dp.noise_multiplier=1"], "central DP"),
    "FedIT with mixed ranks": (["method=fedit", "ranks=[2,4,4,8]"], "needs equal client ranks"),
    "resume and overwrite": (["--resume"], "give one of them"),
}


@pytest.mark.parametrize("case", RUN_CASES, ids=list(RUN_CASES))
def test_refused_run_exits_2_with_one_line_and_keeps_the_existing_run(
    case: str, tmp_path: Path, existing_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = bad_files(tmp_path)
    extra, words = RUN_CASES[case]
    extra = [item.format(**files) for item in extra]
    config = [e for e in extra if not e.startswith("--") and "=" not in e]
    flags = [e for e in extra if e.startswith("--")]
    overrides = [e for e in extra if "=" in e]
    argv = ["run", *config, *tiny_overrides(write_classification_jsonl(tmp_path / "rows.jsonl")), *overrides]
    before = snapshot(existing_run.parent)
    code = main([*argv, "--out", str(existing_run), "--overwrite", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert snapshot(existing_run.parent) == before


def test_study_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine")
    assert main(["study", "hafl-20ng", "--out", str(target), "--report", str(tmp_path / "report")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "mine" and not (tmp_path / "report").exists()


def test_study_finished_only_on_an_empty_folder_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    code = main(["study", "hafl-20ng", "--out", str(tmp_path / "runs"), "--finished-only", "--report", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no finished runs" in err
    assert list((tmp_path / "runs").iterdir()) == [] and not (tmp_path / "report").exists()


@pytest.mark.parametrize("damage", ["adapter", "initial"])
def test_analyze_a_corrupt_run_is_input_error(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    data = write_classification_jsonl(tmp_path / "rows.jsonl")
    assert main(["run", *tiny_overrides(data, rounds=1, method="fedsa-lora"), "--out", str(out)]) == 0
    capsys.readouterr()
    target = out / ("adapter/adapter_model.safetensors" if damage == "adapter" else "initial/global.safetensors")
    target.write_bytes(target.read_bytes()[:100])
    assert main(["analyze", str(out), "--out", str(tmp_path / "analysis")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a readable safetensors file" in err, err


def test_a_failed_first_round_gives_back_the_run_it_replaced(
    tmp_path: Path, existing_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--overwrite replaces a run only once the new one has finished a round."""
    from fedtune.runtime.simulator import Simulator

    def broken_round(self: Simulator, *args: object, **kwargs: object) -> dict:
        raise RuntimeError("out of memory in round 1")

    monkeypatch.setattr(Simulator, "run_round", broken_round)
    data = write_classification_jsonl(tmp_path / "rows.jsonl")
    before = snapshot(existing_run.parent)
    assert main(["run", *tiny_overrides(data), "--out", str(existing_run), "--overwrite"]) == 1
    assert "out of memory" in capsys.readouterr().err
    assert snapshot(existing_run.parent) == before


def test_a_fresh_process_prints_only_fedtunes_words(tmp_path: Path) -> None:
    """Errors raised after the model libraries load: stderr stays one line (no bitsandbytes
    kernel notice, no deprecation warnings from inside the libraries)."""
    data = write_classification_jsonl(tmp_path / "rows.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "fedtune.cli", "run", *tiny_overrides(data), "lora.r=64", "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("fedtune: error:"), result.stderr
    ok = subprocess.run([*argv[:-3], "--out", str(tmp_path / "ok")], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0 and ok.stderr.strip() == "", ok.stderr
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["rounds"] == 2


def test_makefile_turns_offline_mode_on_only_beside_a_local_data_copy(tmp_path: Path) -> None:
    """A newcomer with network and no ../shared must reach the Hub; CI (with ../shared) stays offline."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "Makefile", checkout / "Makefile")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "FEDTUNE_DATA_DIR")}

    def variables() -> str:
        return subprocess.run(["make", "-pn", "setup"], cwd=checkout, env=env, capture_output=True, text=True).stdout

    assert "HF_HUB_OFFLINE = 1" not in variables()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "README.md").write_text("data\n")
    assert "HF_HUB_OFFLINE = 1" in variables() and "FEDTUNE_DATA_DIR = $(SHARED_DATA)" in variables()


def test_a_run_prints_only_fedtune_words(tmp_path: Path) -> None:
    """No library notices at start-up (bitsandbytes' optional-kernel note, deprecation warnings)."""
    data = write_classification_jsonl(tmp_path / "rows.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "run", *tiny_overrides(data, progress="false"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[0].startswith("method ") and "run directory" in done.stdout.splitlines()[-1]
