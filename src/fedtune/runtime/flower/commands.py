"""``fedtune flower ...``: the distributed runtime's commands.

    fedtune flower simulate [CONFIG.yaml] [key=value ...] --out DIR [--resume] [--overwrite]
    fedtune flower app [CONFIG.yaml] [key=value ...] --out DIR --app-dir APP_DIR [--resume]
    fedtune flower tls --dir DIR [--host SERVER ...]
    fedtune flower gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --certs DIR
    fedtune flower node-key PATH
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def _config(args: argparse.Namespace) -> Any:
    from fedtune.config import load_config
    from fedtune.console import split_config_and_overrides

    path, overrides = split_config_and_overrides(args.items)
    return load_config(path, overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.console import format_summary
    from fedtune.data.federated import plan_partitions
    from fedtune.errors import UsageError
    from fedtune.rundir import RunDir, check_run_dir
    from fedtune.runtime.engine import build_federation
    from fedtune.runtime.flower.simulate import simulate

    from fedtune.tracking import check_backends

    config = _config(args)
    check_backends(config.tracking)
    if config.flower.node_partitions:
        raise UsageError("flower.node_partitions names deployed SuperNodes; the simulation engine makes its own nodes")
    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoint" / "server.safetensors").exists():
            raise UsageError(f"--resume: {out} has no checkpoint to resume from")
        RunDir.resume(out, config)  # a changed config is refused, not trained on silently
    else:
        check_run_dir(out, args.overwrite)
    # every check of the config against data, model and method, before Ray starts
    build_federation(config, plan_partitions(config), only_clients=set(), global_test=False)
    start = time.perf_counter()
    summary = simulate(config, out, resume=args.resume, overwrite=args.overwrite)
    print(format_summary({**summary, "wall_seconds": time.perf_counter() - start}, out))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from fedtune.errors import UsageError
    from fedtune.runtime.flower.deploy import write_app
    from fedtune.runtime.flower.strategy import check_node_partitions

    config = _config(args)
    try:  # here rather than when the ServerApp starts on the SuperLink
        check_node_partitions(config.flower.node_partitions, config.clients)
    except ValueError as err:
        raise UsageError(str(err)) from None
    app_dir = write_app(config, Path(args.out), Path(args.app_dir), resume=args.resume, overwrite=args.overwrite)
    print(f"Flower app written to {app_dir}; start it with: flwr run {app_dir} <connection> --stream")
    return 0


def cmd_tls(args: argparse.Namespace) -> int:
    from fedtune.runtime.flower.deploy import make_tls

    files = make_tls(Path(args.dir), args.host or [])
    for role, path in files.items():
        print(f"{role:>4}: {path}")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from fedtune.errors import UsageError
    from fedtune.runtime.flower.gateway import run_gateway

    try:
        run_gateway(args.listen, args.superlink, Path(args.certs))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from fedtune.runtime.flower.deploy import make_node_key

    private, public = make_node_key(Path(args.path))
    print(f"private key: {private}\npublic key:  {public} (register it: flwr supernode register {public} <connection>)")
    return 0


def add_flower_commands(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    flower = sub.add_parser("flower", help="the distributed runtime on Flower")
    commands = flower.add_subparsers(dest="flower_command", required=True, parser_class=parser_class)

    simulate = commands.add_parser("simulate", help="run on Flower's simulation engine (Ray)")
    simulate.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value")
    simulate.add_argument("--out", required=True)
    simulate.add_argument("--resume", action="store_true", help="continue a stopped run from its last complete round")
    simulate.add_argument("--overwrite", action="store_true")
    simulate.set_defaults(func=cmd_simulate)

    app = commands.add_parser("app", help="write a Flower app folder for `flwr run` (deployment)")
    app.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value")
    app.add_argument("--out", required=True, help="run directory, on the SuperLink's machine")
    app.add_argument("--app-dir", required=True)
    app.add_argument("--resume", action="store_true")
    app.add_argument("--overwrite", action="store_true")
    app.set_defaults(func=cmd_app)

    tls = commands.add_parser("tls", help="make a CA and a SuperLink certificate")
    tls.add_argument("--dir", required=True)
    tls.add_argument("--host", action="append", help="the server's public name or IP (repeatable); 127.0.0.1 and localhost are always added")
    tls.set_defaults(func=cmd_tls)

    gateway = commands.add_parser("gateway", help="serve the SuperLink's Fleet API, and nothing else, on a public address")
    gateway.add_argument("--listen", required=True, help="public HOST:PORT for the SuperNodes, e.g. 0.0.0.0:9092")
    gateway.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's local HOST:PORT (default 127.0.0.1:9093)")
    gateway.add_argument("--certs", required=True, help="the folder written by `fedtune flower tls`")
    gateway.set_defaults(func=cmd_gateway)

    key = commands.add_parser("node-key", help="make a SuperNode authentication key pair")
    key.add_argument("path")
    key.set_defaults(func=cmd_node_key)
