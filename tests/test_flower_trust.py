"""Who may do what in a Flower deployment, checked without a running engine.

- the gateway forwards Fleet calls only (the Control and Runtime APIs stay on localhost);
- a client writes only under the directories of its own node config, whatever a message says;
- partition claims: duplicates are refused, and ``flower.node_partitions`` is enforced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import tiny_overrides, write_classification_jsonl
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import RunConfig, load_config
from fedtune.runtime.engine import build_federation
from fedtune.runtime.flower.client_app import personal_evaluate, settings_record, train
from fedtune.runtime.flower.deploy import make_tls, write_connection
from fedtune.runtime.flower.gateway import gateway_app, parse_address
from fedtune.runtime.flower.records import to_record
from fedtune.runtime.flower.simulate import simulation_client_app
from fedtune.runtime.flower.strategy import FedtuneStrategy, PartitionClaimError, check_node_partitions
from fedtune.runtime.server import FederatedServer


@pytest.fixture(autouse=True, scope="module")
def server_identity() -> Iterator[None]:
    """The identity a ServerApp process has (flwr needs it to create messages), restored afterwards."""
    saved = {name: TaskIdentity.__dict__[name] for name in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, SUPERLINK_NODE_ID
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


# -- the gateway ---------------------------------------------------------------------------------
class Upstream:
    """A stand-in SuperLink that records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-upstream", b"yes")]})
        await send({"type": "http.response.body", "body": b"pong:" + body})


def call(app: Any, method: str, path: str, raw_path: str | None = None, query: bytes = b"", body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP request straight into an ASGI app, the way uvicorn would pass it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "https",
        "path": path, "raw_path": (raw_path or path).encode(), "query_string": query, "root_path": "",
        "headers": [(b"content-type", b"application/protobuf"), (b"x-flwr-signature", b"sig"), (b"content-length", str(len(body)).encode())],
        "client": ("198.51.100.7", 40000), "server": ("127.0.0.2", 9092),
    }  # fmt: skip
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_gateway_forwards_fleet_calls_with_their_headers_and_body() -> None:
    upstream = Upstream()
    app = gateway_app("127.0.0.1:9093", transport=httpx.ASGITransport(app=upstream))
    status, headers, body = call(app, "POST", "/v1/fleet/pull-messages", body=b"\x08\x01")
    assert (status, body, headers.get("x-upstream")) == (200, b"pong:\x08\x01", "yes")
    method, path, sent_headers, sent_body = upstream.seen[0]
    assert (method, path, sent_body) == ("POST", "/v1/fleet/pull-messages", b"\x08\x01")
    assert sent_headers["x-flwr-signature"] == "sig" and sent_headers["host"] == "127.0.0.1:9093"


@pytest.mark.parametrize(
    ("method", "path", "raw_path", "query"),
    [
        ("POST", "/v1/control/list-runs", None, b""),  # flwr ls
        ("POST", "/v1/control/register-node", None, b""),  # flwr supernode register
        ("POST", "/v1/control/start-run", None, b""),  # flwr run
        ("POST", "/v1/runtime/acquire-task", None, b""),  # a ServerApp process's task
        ("GET", "/v1/fleet/pull-messages", None, b""),
        ("POST", "/v1/fleet/../control/list-runs", None, b""),
        ("POST", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", b""),
        ("POST", "/v1/fleet/x/../../control/list-runs", None, b""),
        ("POST", "/v1/fleet/pull-messages", None, b"next=/v1/control/list-runs"),
        ("POST", "/docs", None, b""),
        ("POST", "/", None, b""),
    ],
)
def test_gateway_refuses_everything_but_fleet_calls(method: str, path: str, raw_path: str | None, query: bytes) -> None:
    upstream = Upstream()
    app = gateway_app("127.0.0.1:9093", transport=httpx.ASGITransport(app=upstream))
    status, _, body = call(app, method, path, raw_path, query)
    assert status == 403 and b"only the Flower Fleet API" in body
    assert upstream.seen == []


def test_gateway_addresses() -> None:
    assert parse_address("0.0.0.0:9092") == ("0.0.0.0", 9092) and parse_address("[::]:9092") == ("::", 9092)
    for bad in ("9092", "host:", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            parse_address(bad)


def test_connections_go_to_localhost_and_certificates_cover_it(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_tls(tmp_path / "certs", ["server.example.org"])
    cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    write_connection(tmp_path / "home", "op", "127.0.0.1:9093", files["ca"])
    write_connection(tmp_path / "home", "op", "localhost:9093", files["ca"])
    with pytest.raises(ValueError, match="Control API is served on 127.0.0.1 only"):
        write_connection(tmp_path / "home", "op", "server.example.org:9093", files["ca"])


def test_fedtune_flower_app_checks_node_partitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import EXIT_USAGE, main

    argv = ["flower", "app", "clients=2", "flower.node_partitions={11: 0, 12: 0}", "--out", str(tmp_path / "o"), "--app-dir", str(tmp_path / "a")]
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "fedtune: error: flower.node_partitions: nodes [11, 12] are all assigned partition 0"
    assert not (tmp_path / "a").exists()


def test_flower_commands_refuse_bad_trust_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import EXIT_USAGE, main

    assert main(["flower", "simulate", "clients=2", "flower.node_partitions={1: 0, 2: 1}", "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "flower.node_partitions names deployed SuperNodes" in capsys.readouterr().err
    assert main(["flower", "gateway", "--listen", "0.0.0.0:9092", "--certs", str(tmp_path / "none")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"fedtune: error: --certs {tmp_path / 'none'}: missing ") and "fedtune flower tls" in err
    make_tls(tmp_path / "certs", [])
    assert main(["flower", "gateway", "--listen", "0.0.0.0", "--certs", str(tmp_path / "certs")]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "fedtune: error: '0.0.0.0' is not HOST:PORT"


# -- where a client writes -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def alora(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, FederatedServer]:
    dataset = write_classification_jsonl(tmp_path_factory.mktemp("trust") / "cls.jsonl")
    config = load_config(None, tiny_overrides(dataset, method="fed-alora", clients=2, rounds=1))
    return config, FederatedServer(build_federation(config, only_clients=set(), global_test=False))


def message(config: RunConfig, server: FederatedServer, kind: str, **settings: Any) -> Message:
    payload, _ = server.payload(0)
    content = RecordDict({"arrays": to_record(payload), "config": settings_record(config, 0, 1, **settings)})
    return Message(content, dst_node_id=7, message_type=kind)


def node_context(**node_config: Any) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, **node_config}, state=RecordDict(), run_config={})


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_a_client_ignores_server_sent_paths(alora: tuple[RunConfig, FederatedServer], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config, server = alora
    own, evil = tmp_path / "node-state", tmp_path / "server-chose"
    paths = {"state-dir": str(evil / "state"), "export-dir": str(evil / "export")}
    context = node_context(**{"state-dir": str(own)})
    with caplog.at_level(logging.WARNING, logger="fedtune.flower.client"):
        reply = train(message(config, server, MessageType.TRAIN, **paths), context)
        assert not reply.has_error()
        personal_evaluate(message(config, server, MessageType.EVALUATE, export=True, **paths), context)
    assert not evil.exists()
    assert "client-0/round-1.safetensors" in files_under(own)
    assert "0/adapter/adapter_model.safetensors" in files_under(own)  # export-dir defaults to the state dir
    assert "ignoring the server-sent state-dir" in caplog.text and "ignoring the server-sent export-dir" in caplog.text


def test_a_node_config_export_dir_takes_the_personal_adapter(alora: tuple[RunConfig, FederatedServer], tmp_path: Path) -> None:
    config, server = alora
    context = node_context(**{"state-dir": str(tmp_path / "state"), "export-dir": str(tmp_path / "adapters")})
    personal_evaluate(message(config, server, MessageType.EVALUATE, export=True, **{"export-dir": str(tmp_path / "evil")}), context)
    assert files_under(tmp_path / "adapters") and "0/adapter/adapter_model.safetensors" in files_under(tmp_path / "adapters")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "state" / "0").exists()


def test_a_node_without_dirs_writes_nothing(alora: tuple[RunConfig, FederatedServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, server = alora
    monkeypatch.chdir(tmp_path)
    context = node_context()
    train(message(config, server, MessageType.TRAIN, **{"state-dir": str(tmp_path / "evil")}), context)
    personal_evaluate(message(config, server, MessageType.EVALUATE, export=True, **{"export-dir": str(tmp_path / "evil")}), context)
    assert files_under(tmp_path) == []
    assert any(name.startswith("fedtune-local") for name in context.state.array_records)  # kept in memory instead


def test_the_simulation_supplies_each_run_its_dirs_as_node_config(alora: tuple[RunConfig, FederatedServer], tmp_path: Path) -> None:
    config, server = alora
    app = simulation_client_app([(config, tmp_path / "run")])
    # the simulation engine's node config: a partition id and nothing else
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    app(message(config, server, MessageType.TRAIN, **{"state-dir": str(tmp_path / "evil")}), context)
    app(message(config, server, MessageType.EVALUATE, export=True), context)
    written = files_under(tmp_path / "run")
    assert "client_state/client-0/round-1.safetensors" in written and "clients/0/adapter/adapter_model.safetensors" in written
    assert all(f.startswith(("client_state/client-0/", "clients/0/")) for f in written)
    # a message for a run the simulation's operator did not start gets no dirs at all
    other = config.model_copy(update={"seed": config.seed + 1})
    app(message(other, server, MessageType.TRAIN, **{"state-dir": str(tmp_path / "evil")}), context)
    assert not (tmp_path / "evil").exists() and files_under(tmp_path / "run") == written


# -- partition claims ----------------------------------------------------------------------------
class ClaimsGrid:
    """Online nodes answering the partition query with ``claims`` (node id -> claim)."""

    def __init__(self, claims: dict[int, Any]) -> None:
        self.claims = claims
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for request in messages:
            node = request.metadata.dst_node_id
            self.asked.append(node)
            claim = self.claims[node]
            if isinstance(claim, Error):
                replies.append(Message(claim, reply_to=request))
            else:
                replies.append(Message(RecordDict({"metrics": MetricRecord({"partition-id": claim})}), reply_to=request))
        return replies


def strategy_for(clients: int, node_partitions: dict[int, int] | None = None) -> FedtuneStrategy:
    config = load_config(None, [f"clients={clients}", f"flower.node_partitions={node_partitions or {}}"])
    return FedtuneStrategy(SimpleNamespace(config=config, method=None))  # discover needs only the config


def test_honest_claims_map_partitions_to_nodes() -> None:
    strategy = strategy_for(3)
    strategy.discover(ClaimsGrid({501: 2, 502: 0, 503: 1}))
    assert strategy.node_of == {0: 502, 1: 503, 2: 501}


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({501: 0, 502: 0, 503: 1}, "nodes 501 and 502 both claim partition 0"),
        ({501: 0, 502: 1, 503: 3}, r"node 503 claims partition 3; this run has partitions 0\.\.2"),
        ({501: 0, 502: 1, 503: -1}, "node 503 claims partition -1"),
        ({501: 0, 502: 1, 503: 1.0}, "node 503: its reply has no integer partition-id"),
        ({501: 0, 502: 1, 503: Error(code=0, reason="no partition-id")}, "node 503 did not report its partition: no partition-id"),
    ],
)
def test_bad_claims_stop_discovery(claims: dict[int, Any], error: str) -> None:
    with pytest.raises(PartitionClaimError, match=error):
        strategy_for(3).discover(ClaimsGrid(claims))


def test_extra_node_claiming_a_taken_partition_is_refused_without_a_mapping() -> None:
    with pytest.raises(PartitionClaimError, match="both claim partition 1.*set flower.node_partitions"):
        strategy_for(2).discover(ClaimsGrid({501: 0, 502: 1, 666: 1}))


def test_node_partitions_are_enforced() -> None:
    mapping = {501: 0, 502: 1}
    strategy = strategy_for(2, mapping)
    grid = ClaimsGrid({501: 0, 502: 1, 666: 1})  # 666: registered, online, not in the mapping
    strategy.discover(grid)
    assert strategy.node_of == {0: 501, 1: 502} and sorted(grid.asked) == [501, 502]
    with pytest.raises(PartitionClaimError, match="node 502 claims partition 0, but flower.node_partitions assigns it partition 1"):
        strategy_for(2, mapping).discover(ClaimsGrid({501: 0, 502: 0}))


@pytest.mark.parametrize(
    ("mapping", "error"),
    [
        ({1: 0, 2: 0}, r"nodes \[1, 2\] are all assigned partition 0"),
        ({1: 0, 2: 5}, r"partitions \[5\] are outside 0\.\.1"),
        ({1: 0}, r"no node is assigned partitions \[1\]"),
    ],
)
def test_bad_node_partitions_are_refused(mapping: dict[int, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_node_partitions(mapping, 2)
    with pytest.raises(ValueError, match=error):  # discover checks before waiting for any node
        strategy_for(2, mapping).discover(ClaimsGrid({}))

