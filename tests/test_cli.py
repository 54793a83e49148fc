"""The command line: listings, the run contract, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedtune.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    from fedtune.methods import METHODS

    for name in METHODS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    for setting in ("server_opt.name=", "fedprox.mu=", "scaffold.enabled=true"):
        assert setting in out


def test_datasets_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0
    for name in ("20newsgroups", "dolly15k", "gsm8k", "glue/sst2", "boolq", "arc-e", "arc-c", "openbookqa"):
        assert name in out


BAD_INPUTS = {
    "unknown method": (["method=fedbogus"], "unknown method 'fedbogus'"),
    "missing dataset file": (["dataset=/nonexistent/data.jsonl"], "dataset file not found"),
    "rank zero": (["lora.r=0"], "lora.r"),
    "negative rank": (["lora.r=-4"], "lora.r"),
    "more clients than examples": (["clients=500"], "clients=500 but the training set has only"),
    "unknown setting": (["bogus_key=1"], "bogus_key: unknown setting"),
    "bad partition": (["partition=random"], "partition"),
    "ffa-lora with per-client init": (["method=ffa-lora", "lora.init_seed_mode=per_client"], "identical on all clients"),
    "missing model path": (["model=./no/such/model"], "model path not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, cls_file: Path, tmp_path: Path, capsys) -> None:
    extra, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    code, _, err = run_cli(["run", *tiny_overrides(cls_file), *extra, "--out", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not out.exists(), "a failed start must not leave a run directory"


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "config file not found" in err


def test_existing_run_dir_is_never_overwritten_without_flag(cls_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not lose me")
    code, _, err = run_cli(["run", *tiny_overrides(cls_file, rounds=1), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert keep.read_text() == "do not lose me"
    code, out_text, _ = run_cli(["run", *tiny_overrides(cls_file, rounds=1), "--out", str(out), "--overwrite"], capsys)
    assert code == 0
    assert not keep.exists() and (out / "summary.json").exists()
    assert "final accuracy" in out_text


def test_yaml_config_with_overrides(cls_file: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("method: fedsa-lora\nrounds: 5\nlora:\n  r: 2\n")
    out = tmp_path / "run"
    code, _, _ = run_cli(["run", str(config), *tiny_overrides(cls_file, rounds=1), "lora.r=3", "--out", str(out)], capsys)
    assert code == 0
    resolved = (out / "config.yaml").read_text()
    assert "method: fedsa-lora" in resolved and "rounds: 1" in resolved and "r: 3" in resolved


def test_console_script_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedtune")
    result = subprocess.run([str(exe), "run", "method=nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown method" in result.stderr


def test_dtype_flag_sets_the_wire_precision_and_summary_totals(cls_file: Path, tmp_path: Path, capsys) -> None:
    import json

    out = tmp_path / "bf16"
    code, _, _ = run_cli(["run", *tiny_overrides(cls_file, rounds=2), "--dtype", "bfloat16", "--out", str(out)], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["wire_dtype"] == "bfloat16"
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows) == sum(summary["bytes_up_per_client"].values())
    assert rows[-1]["cumulative_bytes_up"] == summary["total_bytes_up"]
    assert (out / "plots" / "accuracy_vs_uplink_bytes.png").exists()
    code, _, err = run_cli(["run", *tiny_overrides(cls_file), "--dtype", "int8", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "invalid choice" in err


def test_no_module_imports_the_cli() -> None:
    """The commands share fedtune.console; only the entry point imports fedtune.cli (no cycle)."""
    src = Path(__file__).resolve().parents[1] / "src" / "fedtune"
    importers = [p.name for p in src.rglob("*.py") if p.name != "cli.py" and ("fedtune.cli import" in p.read_text() or "import fedtune.cli" in p.read_text())]
    assert importers == []
