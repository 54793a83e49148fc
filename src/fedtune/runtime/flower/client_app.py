"""The fedtune ClientApp: one federated client, trained with the simulator's own code.

The server sends, with every request, the run's resolved config (YAML) and the client id,
so the ClientApp needs no files of its own; the node's ``node_config`` may add
``data-dir`` (where this machine keeps the datasets), ``state-dir`` (where it keeps its
local parts between rounds and runs) and ``export-dir`` (where it writes its personal
adapter; default: the state dir). A client writes files only under these node-config
directories, which its data holder chose: a path in a server's message is ignored, so a
server cannot make a node write (or overwrite) anywhere else on the node's machine.

The base model and the client's tokenised shard are built once per process and cached
(keyed by the config), so Flower's simulation engine, whose Ray actors live across rounds,
loads the model once per actor, not once per round. ``MODEL_LOADS`` counts the loads; every
reply reports it.

Local parts (FedSA-LoRA's B, Fed-ALoRA's A, HAFL's importance, FLoRA's merged weights)
live in ``context.state`` and, when a state dir is known, in per-round files
``client-<id>/round-<t>.safetensors`` (atomic writes, last two kept): a resumed run
restarts round t from the client's state of its last round before t.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType
from safetensors.torch import load_file, save_file

from fedtune.config import RunConfig
from fedtune.data.federated import encode_client, plan_own_data, plan_partitions
from fedtune.runtime.engine import Federation, build_federation, client_turn
from fedtune.runtime.flower.records import from_record, to_record
from fedtune.state import State

log = logging.getLogger("fedtune.flower.client")
app = ClientApp()

#: per process: config hash -> (federation, partition plan); one base model per config,
#: every client this process serves tokenised into it on first use
_FEDERATIONS: dict[str, tuple[Federation, Any]] = {}
MODEL_LOADS = 0
LOCAL_RECORD = "fedtune-local"


def _config_from(message: Message) -> tuple[RunConfig, dict[str, Any]]:
    settings = message.content["config"]
    config = RunConfig.model_validate(yaml.safe_load(str(settings["fedtune-config"])))
    return config, dict(settings)


def federation_for(config: RunConfig, client_id: int, node_config: Any) -> Federation:
    """The process's federation for ``config``, with client ``client_id``'s shard encoded.

    The node's ``node_config`` may name ``data-dir`` (the shared datasets' folder on this
    machine; the shard is then the partition ``client_id`` of the run's dataset) or
    ``dataset`` (this data holder's own file, used whole as its shard).
    """
    global MODEL_LOADS
    if node_config.get("data-dir"):
        config = config.model_copy(update={"data_dir": str(node_config["data-dir"])})
    own_data = node_config.get("dataset")
    digest = hashlib.sha256((config.model_dump_json() + str(own_data)).encode()).hexdigest()
    if digest not in _FEDERATIONS:
        start = time.perf_counter()
        if config.threads is None:
            torch.set_num_threads(max(1, int(config.flower.client_cpus)))
        plan = plan_own_data(config, client_id, str(own_data)) if own_data else plan_partitions(config)
        _FEDERATIONS[digest] = (build_federation(config, plan, only_clients=set(), global_test=False), plan)
        MODEL_LOADS += 1
        log.info("fedtune: model loaded in pid %d (load %d of this process, %.1f s)", os.getpid(), MODEL_LOADS, time.perf_counter() - start)
    fed, plan = _FEDERATIONS[digest]
    if not fed.data.clients[client_id].train:
        fed.data.clients[client_id] = encode_client(plan, fed.loaded.encoder, config.max_seq_len, client_id)
    return fed


# -- local state between rounds ------------------------------------------------------------------
#: paths a server may put in its messages (older fedtune servers did): never used, since where
#: a node writes is its data holder's choice, not the server's
SERVER_PATH_KEYS = ("state-dir", "export-dir")
_warned: set[tuple[str, str]] = set()


def _ignore_server_paths(settings: dict[str, Any]) -> None:
    for key in SERVER_PATH_KEYS:
        if settings.get(key) is not None and (key, str(settings[key])) not in _warned:
            _warned.add((key, str(settings[key])))  # once per path, not every round
            log.warning("fedtune: ignoring the server-sent %s %r; this node writes only under its node-config dirs", key, str(settings[key])[:200])


def _state_dir(context: Context, settings: dict[str, Any]) -> Path | None:
    _ignore_server_paths(settings)
    chosen = context.node_config.get("state-dir")
    return Path(str(chosen)) if chosen else None


def _export_dir(context: Context, settings: dict[str, Any]) -> Path | None:
    chosen = context.node_config.get("export-dir")
    return Path(str(chosen)) if chosen else _state_dir(context, settings)


def _record_name(settings: dict[str, Any]) -> str:
    # one node may serve several runs (configs) in one process: keep their states apart
    return LOCAL_RECORD + "-" + hashlib.sha256(str(settings["fedtune-config"]).encode()).hexdigest()[:16]


def load_local(context: Context, settings: dict[str, Any], client_id: int, round_num: int, fed: Federation) -> State:
    """The client's local parts after its last round before ``round_num``."""
    directory = _state_dir(context, settings)
    if directory is not None:
        files = sorted(
            (int(p.stem.split("-")[1]), p) for p in (directory / f"client-{client_id}").glob("round-*.safetensors")
        )
        earlier = [p for r, p in files if r < round_num]
        if earlier:
            return load_file(str(earlier[-1]))
    elif _record_name(settings) in context.state.array_records:
        return from_record(context.state.array_records[_record_name(settings)])
    return fed.method.client_init(fed.initial_state(client_id))


def save_local(context: Context, settings: dict[str, Any], client_id: int, round_num: int, local: State) -> None:
    context.state[_record_name(settings)] = to_record(local)
    directory = _state_dir(context, settings)
    if directory is None:
        return
    folder = directory / f"client-{client_id}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"round-{round_num}.safetensors"
    tmp = target.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in local.items()}, str(tmp))
    os.replace(tmp, target)
    for old in sorted(folder.glob("round-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
        old.unlink()


def _client_id(context: Context, settings: dict[str, Any]) -> int:
    client_id = int(settings["client-id"])
    partition = context.node_config.get("partition-id")
    if partition is not None and int(partition) != client_id:
        raise ValueError(f"message for client {client_id} reached the node of partition {partition}")
    return client_id


# -- handlers ------------------------------------------------------------------------------------
def inject_fault(faults: list[str], client_id: int, round_num: int, upload: State, clients: int) -> tuple[ArrayRecord, int]:
    """A misbehaving client, for testing the server (config ``flower.inject_faults``): the
    arrays it sends and the client id it claims."""
    kinds = [f.split(":")[0] for f in faults if f.split(":")[1:] == [str(client_id)]]
    kind = kinds[0] if kinds else None
    if kind == "impersonate":  # answers as the next client
        return to_record(upload), (client_id + 1) % clients
    if kind == "unknown_id":
        return to_record(upload), clients + 99
    if kind == "garbage_array":  # bytes no numpy parser accepts, under a real key
        record = to_record(upload)
        record[sorted(record.keys())[0]] = Array(dtype="float32", shape=(4,), stype=SType.NUMPY, data=b"\x93NUMPY garbage")
        return record, client_id
    return to_record(_corrupt(kind, client_id, round_num, upload)), client_id


def _corrupt(kind: str | None, client_id: int, round_num: int, upload: State) -> State:
    if kind is None:
        return upload
    if kind == "crash":
        raise RuntimeError(f"injected crash of client {client_id} in round {round_num}")
    key = sorted(upload)[0]
    bad = dict(upload)
    if kind == "nan":
        bad[key] = upload[key].clone().fill_(float("nan"))
    elif kind == "extra_key":
        bad["not.a.parameter"] = torch.zeros(3)
    elif kind == "wrong_shape":
        bad[key] = torch.zeros(upload[key].shape[0] + 1, *upload[key].shape[1:])
    elif kind == "wrong_dtype":
        bad[key] = upload[key].to(torch.int64)
    elif kind == "huge":
        bad[key] = upload[key] + 1e6
    return bad


@app.train()
def train(message: Message, context: Context) -> Message:
    config, settings = _config_from(message)
    client_id = _client_id(context, settings)
    round_num = int(settings["server-round"])
    fed = federation_for(config, client_id, context.node_config)
    received = from_record(message.content["arrays"])
    local = load_local(context, settings, client_id, round_num, fed)
    turn = client_turn(fed, client_id, round_num, received, local)
    save_local(context, settings, client_id, round_num, turn.local)
    arrays, claimed_id = inject_fault(config.flower.inject_faults, client_id, round_num, turn.upload, config.clients)
    metrics = MetricRecord(
        {
            "num-examples": fed.data.clients[client_id].num_examples,
            "client-id": claimed_id,
            "train_loss": turn.result.loss,
            "compute_seconds": turn.result.compute_seconds,
            "train_state_bytes": turn.result.train_state_bytes,
            "model-loads": MODEL_LOADS,
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


@app.evaluate()
def personal_evaluate(message: Message, context: Context) -> Message:
    """The client's own model (its local parts + the current shared parts) on its test split."""
    config, settings = _config_from(message)
    client_id = _client_id(context, settings)
    round_num = int(settings["server-round"])
    fed = federation_for(config, client_id, context.node_config)
    received = from_record(message.content["arrays"])
    local = load_local(context, settings, client_id, round_num + 1, fed)
    state = fed.method.personal_state(received, local, fed.initial_state(client_id), client_id)
    client = fed.data.clients[client_id]
    results = fed.evaluate(state, client.test, client.scored_test)
    if settings.get("export"):
        root = _export_dir(context, settings)
        if root is not None:
            fed.save(state, root / str(client_id))
        else:
            log.warning("fedtune: personal adapter of client %d not written: this node has no state-dir or export-dir", client_id)
    metrics = MetricRecord({"num-examples": max(len(client.test), 1), "client-id": client_id, **results})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def config_text(config: RunConfig) -> str:
    """The config as it travels in ``settings_record`` (and keys a run's local state)."""
    return yaml.safe_dump(config.model_dump(mode="json"))


def settings_record(config: RunConfig, client_id: int, round_num: int, **extra: Any) -> ConfigRecord:
    """What the server sends beside the tensors: the resolved config, who, which round."""
    record = {
        "fedtune-config": config_text(config),
        "client-id": client_id,
        "server-round": round_num,
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    return ConfigRecord(record)



@app.query()
def identify(message: Message, context: Context) -> Message:
    """Tell the server which client (partition) this node serves."""
    partition = context.node_config.get("partition-id")
    if partition is None:
        raise ValueError("this SuperNode has no partition-id in its --node-config")
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": int(partition)})}), reply_to=message)
