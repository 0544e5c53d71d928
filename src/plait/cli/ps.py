"""`plait ps server | init | worker | keys`: one parameter-server process on any host (a typer sub-app of `plait`).

    plait ps server --config CFG.toml --index 0 --workers 4 --bind tcp://0.0.0.0:5000
    plait ps init --config CFG.toml --workers 4 --servers tcp://host-a:5000,tcp://host-b:5000
    plait ps worker --config CFG.toml --rank 0 --workers 4 --servers tcp://host-a:5000,tcp://host-b:5000
    plait ps keys DIR --workers 4     CurveZMQ keys for `sync.curve_keys = "DIR"`, one bound to each worker id
                                      (see plait/ps/security.py)

A server binding beyond loopback needs `sync.curve_keys`, or `--insecure` on a network you trust (plait/ps/trust.py).
`plait ps init` stores the model's initial pieces before the workers start, as the local launcher does; with
`sync.curve_keys` it presents the launcher's key, the only one that may create pieces.

Every process reads the same config; the workers list the servers in the same order. `plait train` runs the same
two functions on localhost (plait/ps/node.py, started by the launcher without the rest of the CLI's imports). A
server resumes from its checkpoint in --state-dir when one exists (--fresh ignores it), so restarting a killed
server is running the same command again.
"""

from __future__ import annotations

import typer

ps_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="Parameter-server processes on any host: servers, the model's pieces, workers, CurveZMQ "
                          "keys.")


def _endpoints(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


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
           insecure: bool = typer.Option(False, "--insecure",
                                         help="listen beyond loopback without CurveZMQ (sync.insecure_bind)"),
           set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Serve one key range (restart it with the same command: it resumes from its checkpoint)."""
    from plait.ps.node import run_server_node

    try:
        run_server_node(config, workers, index, bind=bind, state_dir=state_dir, fresh=fresh, replica=replica,
                        partner=partner, insecure=insecure, overrides=set_)
    except ValueError as err:  # a bad option or config (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None


@ps_app.command()
def init(config: str = typer.Option(..., "--config", help="the run's TOML config"),
         workers: int = typer.Option(..., "--workers", help="number of workers in the job"),
         servers: str = typer.Option(..., "--servers", help="comma-separated server endpoints, in index order"),
         backups: str = typer.Option("", "--backups", help="sync.replication = 2: the replica-1 endpoints"),
         set_: list[str] = typer.Option([], "--set", help="override a config key")) -> None:
    """Store the model's initial pieces on the servers, once, before the workers start."""
    from plait.ps.node import create_pieces_node

    try:
        create_pieces_node(config, workers, _endpoints(servers), _endpoints(backups), overrides=set_)
    except ValueError as err:
        raise SystemExit(str(err)) from None


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
    from plait.ps.node import run_worker_node

    try:
        run_worker_node(config, workers, rank, _endpoints(servers), _endpoints(backups), run_dir=run_dir,
                        wait_start=wait_start, overrides=set_)
    except ValueError as err:
        raise SystemExit(str(err)) from None


@ps_app.command()
def keys(directory: str = typer.Argument(..., help="where to write the keys (created)"),
         workers: int = typer.Option(0, "--workers", min=0,
                                     help="make worker-<r> keys bound to worker ids 0..N-1 (0: the workers share "
                                          "client.key and may use any worker id)")) -> None:
    """Make a CurveZMQ key directory for sync.curve_keys."""
    from plait.ps.security import make_keys

    try:
        made = make_keys(directory, workers)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    worker_keys = "worker-<r>.key_secret to worker r's host" if workers else "client.key_secret to the worker hosts"
    print(f"keys in {made.directory}: copy server.key, server.key_secret, authorized/, control/ and workers/ to the "
          f"server hosts, server.key to every host, {worker_keys} (client.key_secret to an evaluator's), "
          f"launcher.key_secret to the host that runs `plait ps init`; set sync.curve_keys = "
          f"\"{made.directory}\" in the config")
    if not workers:
        print("no worker keys: worker ids are not bound to keys (--workers N binds them; `plait train` issues its "
              "own workers' keys)")
