"""`plait fl server | client | certs`: federated learning over the network (heavy imports stay inside the
commands)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from plait.cli.output import fail, say
from plait.cli.parsing import Commands, add_command, add_group, add_overrides
from plait.runtime.divergence import Diverged
from plait.settings.config import ConfigError, read_config

CERT_HOSTS = ["localhost", "127.0.0.1"]  # `plait fl certs`' default names for the server's certificate


def _load(config: Path, overrides: list[str]) -> Any:
    from plait.federated.net.config import NetworkRunConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = read_config(NetworkRunConfig, config, overrides)
    for w in caught:
        say(f"[yellow]warning:[/] {w.message}", stderr=True)
    return loaded


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def server(args: argparse.Namespace) -> None:
    """Run the federated server: clients dial in, rounds run, metrics and checkpoints go to runs/NAME."""
    from plait.experiment.runs.fl_server import run_server

    _logging()
    try:
        run = run_server(_load(args.config, args.set), resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        fail(str(err))
    except Diverged as err:
        fail(str(err), code=1)
    say(f"run directory: {run.path}", stderr=True)


def client(args: argparse.Namespace) -> None:
    """Run one client: dial the server, train on partition ID when selected, push updates, until done."""
    from plait.federated.net.client import ClientOptions, NetClient

    _logging()
    try:
        properties = {"charging": True, "idle": True, "unmetered": True}
        for item in args.property:
            name, _, value = item.partition("=")
            if name not in properties or value.lower() not in ("true", "false"):
                raise ValueError(f"--property {item!r}: use charging|idle|unmetered=true|false")
            properties[name] = value.lower() == "true"
        opts = ClientOptions(server=args.server, client_id=args.id, cert_dir=str(args.certs or ""),
                             key_file=str(args.key or ""), tls=args.tls, properties=properties, slow_s=args.slow_s,
                             max_retry_s=args.max_retry_s, data_path=str(args.data_path or ""))
        runner = NetClient(_load(args.data, args.set), opts)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    raise SystemExit(runner.run())


def certs(args: argparse.Namespace) -> None:
    """Make a test CA, a server certificate, client certificates and per-client HMAC keys."""
    from plait.federated.net.certs import make_certs

    try:
        out = make_certs(args.out_dir, args.clients, tuple(args.host or CERT_HOSTS), args.days)
    except (FileExistsError, ValueError) as err:
        fail(str(err))
    say(f"wrote CA, server and {args.clients} client credentials to {out}; give client K the files ca.pem and "
        f"clients/client-K.* only", stderr=True)


def add_to(commands: Commands) -> None:
    group = add_group(commands, "fl", "Federated learning over the network: server, clients, certificates.")

    command = add_command(group, "server", server)
    command.add_argument("config", type=Path, help="the run's TOML config (tables run, model, data, fl, net)")
    command.add_argument("--resume", action="store_true", help="continue after the last finished round")
    add_overrides(command, "net.port=0")

    command = add_command(group, "client", client)
    command.add_argument("--server", required=True, help="the server's HOST:PORT")
    command.add_argument("--data", type=Path, required=True,
                         help="the run's TOML config (its model, data, run and net tables)")
    command.add_argument("--id", type=int, required=True, help="this client's id: its partition of [data] and its key")
    command.add_argument("--data-path", type=Path, default=None,
                         help="this client's own data: a .npz (x, y) or a folder with data.npz")
    command.add_argument("--certs", type=Path, default=None, help="directory from `plait fl certs`")
    command.add_argument("--key", type=Path, default=None, help="HMAC key file (default: CERTS/clients/...)")
    command.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                         help="default: on unless HOST is loopback")
    command.add_argument("--property", action="append", default=[],
                         help="device property, e.g. charging=false (repeat for more)")
    command.add_argument("--slow-s", type=float, default=0.0, help="sleep before each push (a slow device)")
    command.add_argument("--max-retry-s", type=float, default=120.0, help="give up after this long unreachable")
    add_overrides(command, "fl.plan.lr=0.1")

    command = add_command(group, "certs", certs)
    command.add_argument("out_dir", type=Path, help="directory to create")
    command.add_argument("--clients", type=int, default=10, help="make keys and certificates for clients 0..N-1")
    command.add_argument("--host", action="append", default=None,
                         help=f"server name or address for its certificate (repeat; default {' '.join(CERT_HOSTS)})")
    command.add_argument("--days", type=int, default=30, help="validity")
