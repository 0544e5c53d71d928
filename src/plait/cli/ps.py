"""`plait ps server | init | worker | keys`: one parameter-server process on any host (a sub-command group of `plait`).

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

import argparse

from plait.cli.parsing import Commands, add_command, add_group, add_overrides


def _endpoints(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def server(args: argparse.Namespace) -> None:
    """Serve one key range (restart it with the same command: it resumes from its checkpoint)."""
    from plait.ps.node import run_server_node

    try:
        run_server_node(args.config, args.workers, args.index, bind=args.bind, state_dir=args.state_dir,
                        fresh=args.fresh, replica=args.replica, partner=args.partner, insecure=args.insecure,
                        overrides=args.set)
    except ValueError as err:  # a bad option or config (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None


def init(args: argparse.Namespace) -> None:
    """Store the model's initial pieces on the servers, once, before the workers start."""
    from plait.ps.node import create_pieces_node

    try:
        create_pieces_node(args.config, args.workers, _endpoints(args.servers), _endpoints(args.backups),
                           overrides=args.set)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def worker(args: argparse.Namespace) -> None:
    """Train as one worker of the job, pushing to and pulling from the servers."""
    from plait.ps.node import run_worker_node

    try:
        run_worker_node(args.config, args.workers, args.rank, _endpoints(args.servers), _endpoints(args.backups),
                        run_dir=args.run_dir, wait_start=args.wait_start, overrides=args.set)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def keys(args: argparse.Namespace) -> None:
    """Make a CurveZMQ key directory for sync.curve_keys."""
    from plait.ps.security import make_keys

    if args.workers < 0:
        raise SystemExit(f"--workers must be >= 0, got {args.workers}")
    try:
        made = make_keys(args.directory, args.workers)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    worker_keys = ("worker-<r>.key_secret to worker r's host" if args.workers
                   else "client.key_secret to the worker hosts")
    print(f"keys in {made.directory}: copy server.key, server.key_secret, authorized/, control/ and workers/ to the "
          f"server hosts, server.key to every host, {worker_keys} (client.key_secret to an evaluator's), "
          f"launcher.key_secret to the host that runs `plait ps init`; set sync.curve_keys = "
          f"\"{made.directory}\" in the config")
    if not args.workers:
        print("no worker keys: worker ids are not bound to keys (--workers N binds them; `plait train` issues its "
              "own workers' keys)")


def _job(command: argparse.ArgumentParser) -> None:
    """The options every process of a job is given alike: its config and the number of workers."""
    command.add_argument("--config", required=True, help="the run's TOML config")
    command.add_argument("--workers", type=int, required=True, help="number of workers in the job")


def _servers(command: argparse.ArgumentParser) -> None:
    command.add_argument("--servers", required=True, help="comma-separated server endpoints, in index order")
    command.add_argument("--backups", default="", help="sync.replication = 2: the replica-1 endpoints")


def add_to(commands: Commands) -> None:
    group = add_group(commands, "ps", "Parameter-server processes on any host: servers, the model's pieces, "
                                      "workers, CurveZMQ keys.")

    command = add_command(group, "server", server)
    _job(command)
    command.add_argument("--index", type=int, required=True, help="this server's index, 0..servers-1")
    command.add_argument("--bind", default=None, help="endpoint to bind (default tcp://<sync.host>:0)")
    command.add_argument("--state-dir", default=None, help="checkpoint and log directory (default runs/<name>/servers)")
    command.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    command.add_argument("--replica", type=int, default=0, help="sync.replication = 2: which of the range's two")
    command.add_argument("--partner", default="", help="sync.replication = 2: the other replica's endpoint")
    command.add_argument("--insecure", action="store_true",
                         help="listen beyond loopback without CurveZMQ (sync.insecure_bind)")
    add_overrides(command, "sync.consistency=ssp:2")

    command = add_command(group, "init", init)
    _job(command)
    _servers(command)
    add_overrides(command, "sync.consistency=ssp:2")

    command = add_command(group, "worker", worker)
    _job(command)
    command.add_argument("--rank", type=int, required=True, help="this worker's rank, 0..workers-1")
    _servers(command)
    command.add_argument("--run-dir", default=None, help="where its metrics go (default runs/<name>)")
    command.add_argument("--wait-start", action="store_true",
                         help="after init, write ready-<rank> and wait for start (local launcher)")
    add_overrides(command, "sync.consistency=ssp:2")

    command = add_command(group, "keys", keys)
    command.add_argument("directory", help="where to write the keys (created)")
    command.add_argument("--workers", type=int, default=0,
                         help="make worker-<r> keys bound to worker ids 0..N-1 (0: the workers share client.key and "
                              "may use any worker id)")
