"""`plait ps server | worker | keys`: start one parameter-server process on any host (a typer sub-app of `plait`).

    plait ps server --config CFG.toml --index 0 --workers 4 --bind tcp://0.0.0.0:5000
    plait ps worker --config CFG.toml --rank 0 --workers 4 --servers tcp://host-a:5000,tcp://host-b:5000
    plait ps keys DIR      CurveZMQ keys for `sync.curve_keys = "DIR"` (see security.py)

Every process reads the same config; the workers list the servers in the same order. `plait train` runs exactly
these commands on localhost (launcher.py, through `python -m plait.ps.node`, the same commands without the rest of
the CLI's imports). A server resumes from its checkpoint in --state-dir when one exists (--fresh ignores it), so
restarting a killed server is running the same command again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from plait.ps.config import PSRunConfig
from plait.settings.config import apply_overrides, from_dict, load_toml

ps_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="Parameter-server processes on any host: servers, workers, CurveZMQ keys.")


def load_config(path: str, overrides: list[str]) -> PSRunConfig:
    return from_dict(PSRunConfig, apply_overrides(load_toml(path), overrides))


def server_config(config: PSRunConfig, index: int, workers: int, bind: str, state_dir: Path, fresh: bool,
                  replica: int = 0, partner: str = ""):
    from plait.ps.server_config import ServerConfig

    return ServerConfig(index=index, endpoint=bind, num_workers=workers, consistency=config.sync.consistency,
                        optimizer=config.optimizer, checkpoint_every=config.sync.checkpoint_every,
                        worker_timeout_s=config.sync.worker_timeout_s, state_dir=str(state_dir), resume=not fresh,
                        curve_keys=config.sync.curve_keys, replication=config.sync.replication, replica=replica,
                        partner=partner, failover_s=config.sync.failover_s)


def _loaded(path: str, overrides: list[str], workers: int) -> PSRunConfig:
    config = load_config(path, overrides)
    config.check_workers(workers)
    return config


@ps_app.command()
def server(config: str = typer.Option(..., "--config", help="the run's TOML config"),
           workers: int = typer.Option(..., "--workers", help="number of workers in the job"),
           index: int = typer.Option(..., "--index", help="this server's index, 0..servers-1"),
           bind: str | None = typer.Option(None, "--bind", help="endpoint to bind (default tcp://<sync.host>:0)"),
           state_dir: str | None = typer.Option(None, "--state-dir",
                                                help="checkpoint and log directory (default runs/<name>/servers)"),
           fresh: bool = typer.Option(False, "--fresh", help="ignore an existing checkpoint"),
           replica: int = typer.Option(0, "--replica", help="sync.replication = 2: which of the range's two"),
           partner: str = typer.Option("", "--partner", help="sync.replication = 2: the other replica's endpoint"),
           set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Serve one key range (restart it with the same command: it resumes from its checkpoint)."""
    from plait.ps.server import run_server

    cfg = _loaded(config, set_, workers)
    if not 0 <= index < cfg.sync.servers:
        raise SystemExit(f"--index {index} outside 0..{cfg.sync.servers - 1} (sync.servers)")
    if not 0 <= replica < cfg.sync.replication:
        raise SystemExit(f"--replica {replica} outside 0..{cfg.sync.replication - 1} (sync.replication)")
    directory = Path(state_dir) if state_dir else Path(cfg.run.root) / cfg.run.name / "servers"
    directory.mkdir(parents=True, exist_ok=True)
    run_server(server_config(cfg, index, workers, bind or f"tcp://{cfg.sync.host}:0", directory, fresh, replica,
                             partner))


@ps_app.command()
def worker(config: str = typer.Option(..., "--config", help="the run's TOML config"),
           workers: int = typer.Option(..., "--workers", help="number of workers in the job"),
           rank: int = typer.Option(..., "--rank", help="this worker's rank, 0..workers-1"),
           servers: str = typer.Option(..., "--servers", help="comma-separated server endpoints, in index order"),
           backups: str = typer.Option("", "--backups", help="sync.replication = 2: the replica-1 endpoints"),
           run_dir: str | None = typer.Option(None, "--run-dir", help="where its metrics go (default runs/<name>)"),
           wait_start: bool = typer.Option(False, "--wait-start",
                                           help="after init, write ready-<rank> and wait for start (local launcher)"),
           set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Train as one worker of the job, pushing to and pulling from the servers."""
    from plait.ps.trainer import run_worker

    cfg = _loaded(config, set_, workers)
    endpoints = [e.strip() for e in servers.split(",") if e.strip()]
    if len(endpoints) != cfg.sync.servers:
        raise SystemExit(f"--servers lists {len(endpoints)} endpoints, sync.servers = {cfg.sync.servers}")
    standby = [e.strip() for e in backups.split(",") if e.strip()]
    if len(standby) != (cfg.sync.servers if cfg.sync.replication > 1 else 0):
        raise SystemExit(f"--backups lists {len(standby)} endpoints; sync.replication = {cfg.sync.replication} "
                         "needs one per server with replication 2, none with 1")
    if not 0 <= rank < workers:
        raise SystemExit(f"--rank {rank} outside 0..{workers - 1}")
    out = Path(run_dir) if run_dir else Path(cfg.run.root) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    run_worker(cfg, rank, workers, endpoints, out, start_barrier=wait_start, backups=standby)
    # The work is done and its logs are closed: skip the interpreter's teardown of torch (seconds on a busy
    # machine), so the launcher sees the worker finish when it did.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@ps_app.command()
def keys(directory: str = typer.Argument(..., help="where to write the keys (created)")) -> None:
    """Make a CurveZMQ key directory for sync.curve_keys."""
    from plait.ps.security import make_keys

    try:
        made = make_keys(directory)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    print(f"keys in {made.directory}: copy server.key_secret and authorized/ to the server hosts, server.key "
          f"and client.key_secret to the worker hosts; set sync.curve_keys = \"{made.directory}\" in the config")
