"""Flower's deployment engine on loopback: a SuperLink, fedtune's Fleet gateway and two SuperNodes
started by the test, TLS certificates and SuperNode keys made by the test, SuperNode
authentication on.

127.0.0.2 stands in for the server's public address (Linux routes all of 127/8 to lo): only the
gateway listens there. The SuperLink (Fleet, Control and Runtime APIs on one port) listens on
127.0.0.1, where the operator's ``flwr`` connects. Everything is stopped by PID at the end.
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

import httpx
import pytest
from conftest import tiny_overrides, write_classification_jsonl

from fedtune.config import load_config
from fedtune.rundir import read_metrics
from fedtune.runtime.flower.deploy import make_node_key, make_tls, write_app, write_connection
from fedtune.runtime.flower.simulate import OFFLINE_ENV

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CONNECTION = "fedtune-loopback"
PUBLIC = "127.0.0.2"


def free_port() -> int:
    # free on the public stand-in too: an outsider's refused connection there must mean
    # "nothing listens", not "something else answered"
    with socket.socket() as s, socket.socket() as t:
        s.bind(("127.0.0.1", 0))
        t.bind((PUBLIC, s.getsockname()[1]))
        return s.getsockname()[1]


class Loopback:
    """The processes of one deployment, and how to drive them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(root / "flwr-home"), "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.processes: list[subprocess.Popen] = []
        self.tls = make_tls(root / "certs", [PUBLIC])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the SuperLink: operator only
        self.fleet_port = free_port()
        self.fleet = f"{PUBLIC}:{self.fleet_port}"  # the gateway: SuperNodes (and outsiders)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def flwr(self, *args: str, home: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        env = self.env if home is None else {**self.env, "FLWR_HOME": str(home)}
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def flwr_json(self, *args: str, home: Path | None = None) -> dict:
        # `flwr ... --format json` exits 0 even when the call failed; "success" says
        result = self.flwr(*args, "--format", "json", home=home)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def start_superlink(self) -> None:
        self.start(
            "superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
            "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db"),
        )  # fmt: skip
        self.start(
            "gateway", "fedtune", "flower", "gateway", "--listen", self.fleet, "--superlink", self.address,
            "--certs", str(self.root / "certs"),
        )  # fmt: skip
        write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, self.address, self.tls["ca"])
        deadline = time.time() + 60
        while self.flwr("ls", CONNECTION).returncode != 0 or not self.listening(PUBLIC, self.fleet_port):
            assert time.time() < deadline, (self.root / "superlink.log").read_text()[-2000:]
            time.sleep(1)

    @staticmethod
    def listening(host: str, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex((host, port)) == 0

    def register(self, public_key: Path) -> int:
        result = self.flwr_json("supernode", "register", str(public_key), CONNECTION)
        assert result["success"], result
        return int(result["node-id"])

    def start_supernode(self, name: str, private_key: Path, partition: int, max_retries: int | None = None) -> subprocess.Popen:
        args = [
            "flower-supernode", "--superlink", self.fleet, "--root-certificates", str(self.tls["ca"]),
            "--auth-supernode-private-key", str(private_key), "--port", str(free_port()),
            "--node-config", f'partition-id={partition} state-dir="{self.root / name}"',
        ]  # fmt: skip
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self.start(name, *args)

    def start_run(self, app_dir: Path) -> int:
        started = self.flwr("run", str(app_dir), CONNECTION, "--format", "json")
        assert started.returncode == 0, started.stdout + started.stderr
        return int(json.loads(started.stdout)["run-id"])

    def wait(self, run_id: int, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while True:
            listing = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
            if listing.returncode == 0 and json.loads(listing.stdout).get("success", True):
                status = json.loads(listing.stdout)["runs"][0]
                if str(status["status"]).startswith("finished"):
                    return status
            assert time.time() < deadline, "the run did not finish in time"
            time.sleep(2)

    def run(self, app_dir: Path, timeout: float = 600) -> dict:
        return self.wait(self.start_run(app_dir), timeout)

    def run_ids(self) -> set[int]:
        listing = self.flwr_json("ls", CONNECTION)
        assert listing["success"], listing
        return {int(r["run-id"]) for r in listing["runs"]}

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


def outsider_home(loopback: Loopback, root: Path) -> Path:
    """An outsider's flwr config: the public CA, and the server's public address on both ports."""
    home = root / "outsider-home"
    home.mkdir()
    ca = loopback.tls["ca"].resolve()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fleet-port"\n'
        f'[superlink.fleet-port]\naddress = "{loopback.fleet}"\nroot-certificates = "{ca}"\n'
        f'[superlink.control-port]\naddress = "{PUBLIC}:{loopback.port}"\nroot-certificates = "{ca}"\n'
    )
    return home


def assert_outsider_is_refused(loopback: Loopback, tmp_path: Path) -> None:
    home = outsider_home(loopback, tmp_path)
    before = loopback.run_ids()
    # the control port is not served on the public address at all
    listed = loopback.flwr_json("ls", "control-port", home=home)
    assert not listed["success"] and "unavailable" in listed["error-message"], listed
    # the Fleet port refuses the Control API: no listing, no key registration, no run
    for call in (("ls", "fleet-port"), ("ls", "fleet-port", "--run-id", str(min(before)))):
        listed = loopback.flwr_json(*call, home=home)
        assert not listed["success"] and "403 Forbidden" in listed["error-message"], listed
    outsider_key = make_node_key(tmp_path / "keys" / "outsider")[1]
    registered = loopback.flwr_json("supernode", "register", str(outsider_key), "fleet-port", home=home)
    assert not registered["success"] and "403 Forbidden" in registered["error-message"], registered
    app_dir = write_app(load_config(None, ["clients=2"]), tmp_path / "outsider-out", tmp_path / "outsider-app")
    started = loopback.flwr("run", str(app_dir), "fleet-port", home=home)
    assert started.returncode != 0 and "403" in started.stdout + started.stderr, started.stdout + started.stderr
    # nor the Runtime API, where a ServerApp process fetches its task
    with httpx.Client(verify=str(loopback.tls["ca"])) as client:
        for path in ("/v1/runtime/acquire-task", "/v1/control/list-runs", "/docs"):
            assert client.post(f"https://{loopback.fleet}{path}", content=b"").status_code == 403, path
    assert loopback.run_ids() == before


def registered_nodes(loopback: Loopback) -> set[int]:
    nodes = loopback.flwr_json("supernode", "list", CONNECTION)
    assert nodes["success"], nodes
    return {int(n["node-id"]) for n in nodes["nodes"]}


def test_two_supernodes_with_tls_and_authentication(loopback: Loopback, tmp_path: Path) -> None:
    loopback.start_superlink()
    keys = [make_node_key(tmp_path / "keys" / f"node{i}") for i in range(2)]
    node_ids = [loopback.register(public) for _, public in keys]
    for partition, (private, _) in enumerate(keys):
        loopback.start_supernode(f"node{partition}", private, partition)

    # a SuperNode whose key was never registered is refused (it reaches the SuperLink through the gateway)
    rogue, _ = make_node_key(tmp_path / "keys" / "rogue")
    refused = loopback.start_supernode("rogue", rogue, 0, max_retries=1)
    assert refused.wait(timeout=120) != 0
    assert "Failed to activate" in (tmp_path / "rogue.log").read_text()
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()

    dataset = write_classification_jsonl(tmp_path / "cls.jsonl")
    # the second run names each node's partition (flower.node_partitions); the first trusts their claims
    mapping = f"{{{node_ids[0]}: 0, {node_ids[1]}: 1}}"
    for method, extra in (("fed-alora", {}), ("hetlora", {"ranks": "[2,4]", "flower.node_partitions": mapping})):
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
    # local parts and personal adapters stayed on the nodes, in their state dirs, not the run dir
    assert list((tmp_path / "node0" / "client-0").glob("round-*.safetensors"))
    assert (tmp_path / "node1" / "1" / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run-fed-alora" / "client_state").exists() and not (tmp_path / "run-fed-alora" / "clients").exists()

    # a mapping the nodes contradict stops the run before any training, naming the node
    swapped = load_config(
        None, tiny_overrides(dataset, clients=2, rounds=1, **{"flower.node_partitions": f"{{{node_ids[0]}: 1, {node_ids[1]}: 0}}"})
    )
    run_id = loopback.start_run(write_app(swapped, tmp_path / "run-swapped", tmp_path / "app-swapped"))
    assert loopback.wait(run_id)["status"] == "finished:failed"
    log = loopback.flwr("log", str(run_id), CONNECTION, "--show").stdout
    assert "flower.node_partitions assigns it partition" in log and (str(node_ids[0]) in log or str(node_ids[1]) in log), log[-2000:]
    assert not (tmp_path / "run-swapped" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run-swapped")

    assert_outsider_is_refused(loopback, tmp_path)
    assert registered_nodes(loopback) == set(node_ids)  # neither the rogue's nor the outsider's key
