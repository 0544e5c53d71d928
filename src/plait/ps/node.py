"""Start one parameter-server process, server or worker, on any host:

    python -m plait.ps.node server --config CFG.toml --index 0 --workers 4 --bind tcp://0.0.0.0:5000
    python -m plait.ps.node worker --config CFG.toml --rank 0 --workers 4 \\
        --servers tcp://host-a:5000,tcp://host-b:5000
    python -m plait.ps.node keys DIR      CurveZMQ keys for `sync.curve_keys = "DIR"` (see security.py)

Every process reads the same config; the workers list the servers in the same order. `plait train` runs exactly
these commands on localhost (see launcher.py). A server resumes from its checkpoint in --state-dir when one
exists (pass --fresh to ignore it), so restarting a killed server is running the same command again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from plait.experiment.config import apply_overrides, from_dict, load_toml
from plait.ps.config import PSRunConfig


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plait.ps.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)
    for role in ("server", "worker"):
        sub = roles.add_parser(role)
        sub.add_argument("--config", required=True, help="the run's TOML config")
        sub.add_argument("--workers", type=int, required=True, help="number of workers in the job")
        sub.add_argument("--set", dest="overrides", action="append", default=[], help="override a config key")
    server = roles.choices["server"]
    server.add_argument("--index", type=int, required=True, help="this server's index, 0..servers-1")
    server.add_argument("--bind", default=None, help="endpoint to bind (default tcp://<sync.host>:0, a free port)")
    server.add_argument("--state-dir", default=None, help="checkpoint and log directory (default runs/<name>/servers)")
    server.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    server.add_argument("--replica", type=int, default=0,
                        help="sync.replication = 2: 0 or 1, which of the range's two processes this is")
    server.add_argument("--partner", default="",
                        help="sync.replication = 2: the other replica's endpoint (default: read from its endpoint "
                             "file in --state-dir)")
    worker = roles.choices["worker"]
    worker.add_argument("--rank", type=int, required=True, help="this worker's rank, 0..workers-1")
    worker.add_argument("--servers", required=True, help="comma-separated server endpoints, in index order")
    worker.add_argument("--backups", default="",
                        help="sync.replication = 2: the replica-1 endpoints, comma-separated, in index order")
    worker.add_argument("--run-dir", default=None, help="where the worker's metrics go (default runs/<name>)")
    worker.add_argument("--wait-start", action="store_true",
                        help="after init, write <run-dir>/ready-<rank> and wait for <run-dir>/start (local launcher)")
    keys = roles.add_parser("keys", help="make a CurveZMQ key directory for sync.curve_keys")
    keys.add_argument("directory", help="where to write the keys (created)")
    args = parser.parse_args(argv)
    if args.role == "keys":
        from plait.ps.security import make_keys

        try:
            made = make_keys(args.directory)
        except FileExistsError as err:
            raise SystemExit(str(err)) from None
        print(f"keys in {made.directory}: copy server.key_secret and authorized/ to the server hosts, server.key "
              f"and client.key_secret to the worker hosts; set sync.curve_keys = \"{made.directory}\" in the config")
        return

    config = load_config(args.config, args.overrides)
    config.check_workers(args.workers)
    run_dir = Path(config.run.root) / config.run.name
    if args.role == "server":
        from plait.ps.server import run_server

        if not 0 <= args.index < config.sync.servers:
            raise SystemExit(f"--index {args.index} outside 0..{config.sync.servers - 1} (sync.servers)")
        if not 0 <= args.replica < config.sync.replication:
            raise SystemExit(f"--replica {args.replica} outside 0..{config.sync.replication - 1} (sync.replication)")
        state_dir = Path(args.state_dir) if args.state_dir else run_dir / "servers"
        state_dir.mkdir(parents=True, exist_ok=True)
        bind = args.bind or f"tcp://{config.sync.host}:0"
        run_server(server_config(config, args.index, args.workers, bind, state_dir, args.fresh, args.replica,
                                 args.partner))
    else:
        from plait.ps.trainer import run_worker

        endpoints = [e.strip() for e in args.servers.split(",") if e.strip()]
        if len(endpoints) != config.sync.servers:
            raise SystemExit(f"--servers lists {len(endpoints)} endpoints, sync.servers = {config.sync.servers}")
        backups = [e.strip() for e in args.backups.split(",") if e.strip()]
        if len(backups) != (config.sync.servers if config.sync.replication > 1 else 0):
            raise SystemExit(f"--backups lists {len(backups)} endpoints; sync.replication = "
                             f"{config.sync.replication} needs one per server with replication 2, none with 1")
        if not 0 <= args.rank < args.workers:
            raise SystemExit(f"--rank {args.rank} outside 0..{args.workers - 1}")
        out = Path(args.run_dir) if args.run_dir else run_dir
        out.mkdir(parents=True, exist_ok=True)
        run_worker(config, args.rank, args.workers, endpoints, out, start_barrier=args.wait_start, backups=backups)
        # The work is done and its logs are closed: skip the interpreter's teardown of torch (seconds on a busy
        # machine), so the launcher sees the worker finish when it did.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
