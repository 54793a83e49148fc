"""Pieces of the Flower runtime that need no running engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from conftest import tiny_overrides, write_classification_jsonl

from fedtune.config import FAULT_KINDS, RunConfig, load_config
from fedtune.runtime.flower.client_app import federation_for, inject_fault
from fedtune.runtime.flower.deploy import make_node_key, make_tls, write_app, write_connection
from fedtune.runtime.flower.records import RecordError, from_record, to_record


def test_records_round_trip_and_bf16_travels_as_float32() -> None:
    state = {"a.lora_A": torch.randn(2, 3), "idx": torch.tensor([1, 0], dtype=torch.int32), "b": torch.randn(4).bfloat16()}
    back = from_record(to_record(state))
    assert torch.equal(back["a.lora_A"], state["a.lora_A"]) and back["idx"].dtype == torch.int32
    assert back["b"].dtype == torch.float32 and torch.equal(back["b"], state["b"].float())


def test_a_data_holder_can_bring_its_own_file(tmp_path: Path) -> None:
    shared = write_classification_jsonl(tmp_path / "shared.jsonl", rows=80)
    own = write_classification_jsonl(tmp_path / "own.jsonl", rows=30, seed=5)
    config = load_config(None, tiny_overrides(shared, clients=4))
    fed = federation_for(config, 2, {"dataset": str(own)})
    client = fed.data.clients[2]
    assert len(client.train) + len(client.test) == 30
    assert all(not fed.data.clients[i].train for i in (0, 1, 3))


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_fault_injection_kinds(kind: str) -> None:
    upload = {"m.lora_A": torch.ones(2, 3), "m.lora_B": torch.ones(3, 2)}
    honest, claimed = inject_fault([f"{kind}:1"], 0, 1, upload, clients=4)  # other clients behave
    assert claimed == 0 and all(torch.equal(v, upload[k]) for k, v in from_record(honest).items())
    if kind == "crash":
        with pytest.raises(RuntimeError, match="injected crash"):
            inject_fault([f"{kind}:1"], 1, 1, upload, clients=4)
        return
    record, claimed = inject_fault([f"{kind}:1"], 1, 1, upload, clients=4)
    if kind == "garbage_array":
        with pytest.raises(RecordError, match="unreadable array data"):
            from_record(record)
        return
    bad = from_record(record)
    first = bad["m.lora_A"]
    checks = {
        "nan": lambda: bool(torch.isnan(first).all()),
        "extra_key": lambda: "not.a.parameter" in bad,
        "wrong_shape": lambda: first.shape == (3, 3),
        "wrong_dtype": lambda: first.dtype == torch.int64,
        "huge": lambda: float(first.min()) > 1e5,
        "impersonate": lambda: claimed == 2,
        "unknown_id": lambda: claimed not in range(4),
    }
    assert checks[kind]()


def test_app_folder_embeds_the_config(tmp_path: Path) -> None:
    config = load_config(None, ["method=hetlora", "clients=2", "ranks=[2,4]"])
    app = write_app(config, tmp_path / "run", tmp_path / "app")
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedtune.runtime.flower.server_app:app",
        "clientapp": "fedtune.runtime.flower.client_app:app",
    }
    settings = pyproject["tool"]["flwr"]["app"]["config"]
    assert RunConfig.model_validate(yaml.safe_load(settings["fedtune-config"])) == config
    assert settings["out-dir"] == str((tmp_path / "run").resolve()) and settings["resume"] is False


def test_tls_material_and_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    files = make_tls(tmp_path / "certs", ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    assert cert.issuer == ca.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    private, public = make_node_key(tmp_path / "keys" / "node0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    load_ssh_public_key(public.read_bytes())
    config = write_connection(tmp_path / "home", "mine", "127.0.0.1:8000", files["ca"])
    assert tomllib.loads(config.read_text())["superlink"]["mine"]["address"] == "127.0.0.1:8000"
