"""Flower's deployment engine on loopback: a SuperLink and two SuperNodes started by the test,
TLS certificates and SuperNode keys made by the test, SuperNode authentication on.

Everything listens on 127.0.0.1 only and is stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_classification_jsonl

from fedtune.config import load_config
from fedtune.rundir import read_metrics
from fedtune.runtime.flower.deploy import make_node_key, make_tls, write_app, write_connection
from fedtune.runtime.flower.simulate import OFFLINE_ENV

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CONNECTION = "fedtune-loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loopback:
    """The processes of one deployment, and how to drive them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(root / "flwr-home"), "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.processes: list[subprocess.Popen] = []
        self.tls = make_tls(root / "certs", ["127.0.0.1", "localhost"])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_superlink(self) -> None:
        self.start(
            "superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
            "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db"),
        )  # fmt: skip
        write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, self.address, self.tls["ca"])
        deadline = time.time() + 60
        while self.flwr("ls", CONNECTION).returncode != 0:
            assert time.time() < deadline, (self.root / "superlink.log").read_text()[-2000:]
            time.sleep(1)

    def register(self, public_key: Path) -> None:
        result = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        assert result.returncode == 0 and json.loads(result.stdout)["success"], result.stdout + result.stderr

    def start_supernode(self, name: str, private_key: Path, partition: int, max_retries: int | None = None) -> subprocess.Popen:
        args = [
            "flower-supernode", "--superlink", self.address, "--root-certificates", str(self.tls["ca"]),
            "--auth-supernode-private-key", str(private_key), "--port", str(free_port()),
            "--node-config", f'partition-id={partition} state-dir="{self.root / name}"',
        ]  # fmt: skip
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self.start(name, *args)

    def run(self, app_dir: Path, timeout: float = 600) -> dict:
        started = self.flwr("run", str(app_dir), CONNECTION, "--format", "json")
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = json.loads(started.stdout)["run-id"]
        deadline = time.time() + timeout
        while True:
            listing = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
            if listing.returncode == 0:
                status = json.loads(listing.stdout)["runs"][0]
                if str(status["status"]).startswith("finished"):
                    return status
            assert time.time() < deadline, "the run did not finish in time"
            time.sleep(2)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Loopback]:
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flwr's deployment commands are not installed")
    deployment = Loopback(tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop()


def test_two_supernodes_with_tls_and_authentication(loopback: Loopback, tmp_path: Path) -> None:
    loopback.start_superlink()
    keys = [make_node_key(tmp_path / "keys" / f"node{i}") for i in range(2)]
    for _, public in keys:
        loopback.register(public)
    for partition, (private, _) in enumerate(keys):
        loopback.start_supernode(f"node{partition}", private, partition)

    # a SuperNode whose key was never registered is refused
    rogue, _ = make_node_key(tmp_path / "keys" / "rogue")
    refused = loopback.start_supernode("rogue", rogue, 0, max_retries=1)
    assert refused.wait(timeout=120) != 0
    assert "Failed to activate" in (tmp_path / "rogue.log").read_text() or refused.returncode == 305

    dataset = write_classification_jsonl(tmp_path / "cls.jsonl")
    for method, extra in (("fed-alora", {}), ("hetlora", {"ranks": "[2,4]"})):
        config = load_config(None, tiny_overrides(dataset, method=method, clients=2, rounds=2, **extra))
        out = tmp_path / f"run-{method}"
        app_dir = write_app(config, out, tmp_path / f"app-{method}")
        status = loopback.run(app_dir)
        assert status["status"] == "finished:completed", status
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["failed_replies"] == 0 and r["rejected_replies"] == 0 for r in rows)
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"] == "flower" and summary["method"] in (method, "fed-alora-decomposed")
    # local parts stayed on the nodes, in their state dirs
    assert list((tmp_path / "node0" / "client-0").glob("round-*.safetensors"))
