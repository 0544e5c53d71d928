"""`plait fl server | client | certs`: federated learning over the network (a typer sub-app of `plait`; heavy imports
stay inside the commands)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from plait.runtime.divergence import Diverged
from plait.settings.config import ConfigError, apply_overrides, from_dict, load_toml

fl_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="Federated learning over the network: server, clients, certificates.")
console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str]):
    from plait.federated.net.config import NetworkRunConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = from_dict(NetworkRunConfig, apply_overrides(load_toml(config), overrides))
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    return loaded


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


@fl_app.command()
def server(config: Path = typer.Argument(..., help="the run's TOML config (tables run, model, data, fl, net)"),
           resume: bool = typer.Option(False, "--resume", help="continue after the last finished round"),
           set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set net.port=0")) -> None:
    """Run the federated server: clients dial in, rounds run, metrics and checkpoints go to runs/NAME."""
    from plait.experiment.runs.fl_server import run_server

    _logging()
    try:
        run = run_server(_load(config, set_), resume=resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        _fail(str(err))
    except Diverged as err:
        _fail(str(err), code=1)
    console.print(f"run directory: {run.path}")


@fl_app.command()
def client(server: str = typer.Option(..., "--server", help="the server's HOST:PORT"),
           data: Path = typer.Option(..., "--data", help="the run's TOML config (its model, data, run and net tables)"),
           id_: int = typer.Option(..., "--id", help="this client's id: its partition of [data] and its key"),
           data_path: Path | None = typer.Option(
               None, "--data-path", help="this client's own data: a .npz (x, y) or a folder with data.npz"),
           certs: Path | None = typer.Option(None, "--certs", help="directory from `plait fl certs`"),
           key: Path | None = typer.Option(None, "--key", help="HMAC key file (default: CERTS/clients/...)"),
           tls: bool | None = typer.Option(None, "--tls/--no-tls", help="default: on unless HOST is loopback"),
           prop: list[str] = typer.Option([], "--property", help="device property, e.g. charging=false"),
           slow_s: float = typer.Option(0.0, "--slow-s", help="sleep before each push (a slow device)"),
           max_retry_s: float = typer.Option(120.0, "--max-retry-s", help="give up after this long unreachable"),
           set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Run one client: dial the server, train on partition ID when selected, push updates, until done."""
    from plait.federated.net.client import ClientOptions, NetClient

    _logging()
    try:
        properties = {"charging": True, "idle": True, "unmetered": True}
        for item in prop:
            name, _, value = item.partition("=")
            if name not in properties or value.lower() not in ("true", "false"):
                raise ValueError(f"--property {item!r}: use charging|idle|unmetered=true|false")
            properties[name] = value.lower() == "true"
        opts = ClientOptions(server=server, client_id=id_, cert_dir=str(certs or ""), key_file=str(key or ""),
                             tls=tls, properties=properties, slow_s=slow_s, max_retry_s=max_retry_s,
                             data_path=str(data_path or ""))
        runner = NetClient(_load(data, set_), opts)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    raise typer.Exit(runner.run())


@fl_app.command()
def certs(out_dir: Path = typer.Argument(..., help="directory to create"),
          clients: int = typer.Option(10, "--clients", help="make keys and certificates for clients 0..N-1"),
          host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                         help="server name or address for its certificate (repeat)"),
          days: int = typer.Option(30, "--days", help="validity")) -> None:
    """Make a test CA, a server certificate, client certificates and per-client HMAC keys."""
    from plait.federated.net.certs import make_certs

    try:
        out = make_certs(out_dir, clients, tuple(host), days)
    except (FileExistsError, ValueError) as err:
        _fail(str(err))
    console.print(f"wrote CA, server and {clients} client credentials to {out}; give client K the files "
                  f"ca.pem and clients/client-K.* only")
