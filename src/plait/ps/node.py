"""One parameter-server process, server or worker, started from the run's config file on any host.

`plait ps server|worker` (plait/cli/ps.py) and the local launcher run the same two functions, so a local run and a
multi-host run start the same programs. The launcher starts them through this module's lean entry point, which
loads none of the command line's imports (a server imports no torch and restarts in a fraction of a second):

    python -m plait.ps.node server '{"config": "runs/ps/config.toml", "workers": 4, "index": 0, ...}'
    python -m plait.ps.node worker '{"config": "runs/ps/config.toml", "workers": 4, "rank": 0, "servers": [...]}'

The JSON object holds the keyword arguments of `run_server_node` or `run_worker_node`: an interface between the
launcher and its children, not one for people (they use `plait ps --help`). A third role, `server-config`, starts a
server from its `ServerConfig` fields alone, without a run's config file (local_servers.py, for a user's own loop).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plait.ps.config import PSRunConfig
from plait.settings.config import from_dict, read_config

PARENT_ENV = "PLAIT_PS_PARENT_PID"  # set by the local launcher: its processes end when it does
PR_SET_PDEATHSIG = 1


def load_node_config(path: str | Path, overrides: Sequence[str], workers: int) -> PSRunConfig:
    """The run's config with `--set` overrides, checked against the job's number of workers."""
    config = read_config(PSRunConfig, path, list(overrides))
    config.check_workers(workers)
    return config


def run_server_node(config: str, workers: int, index: int, bind: str | None = None, state_dir: str | None = None,
                    fresh: bool = False, replica: int = 0, partner: str = "", insecure: bool = False,
                    overrides: Sequence[str] = ()) -> None:
    """Serve key range `index` until SHUTDOWN or a signal; a server with a checkpoint in `state_dir` resumes from it
    unless `fresh`. `insecure` is sync.insecure_bind. Raises ValueError, naming the option, for an index or replica
    outside the config's, or a bind beyond loopback without CurveZMQ (trust.py)."""
    from plait.ps.server import run_server
    from plait.ps.server_config import ServerConfig

    cfg = load_node_config(config, overrides, workers)
    if not 0 <= index < cfg.sync.servers:
        raise ValueError(f"--index {index} outside 0..{cfg.sync.servers - 1} (sync.servers)")
    if not 0 <= replica < cfg.sync.replication:
        raise ValueError(f"--replica {replica} outside 0..{cfg.sync.replication - 1} (sync.replication)")
    directory = Path(state_dir) if state_dir else Path(cfg.run.root) / cfg.run.name / "servers"
    directory.mkdir(parents=True, exist_ok=True)
    sync = cfg.sync
    run_server(ServerConfig(
        index=index, endpoint=bind or f"tcp://{sync.host}:0", num_workers=workers, consistency=sync.consistency,
        optimizer=cfg.optimizer, checkpoint_every=sync.checkpoint_every, worker_timeout_s=sync.worker_timeout_s,
        state_dir=str(directory), resume=not fresh, journal=sync.journal, curve_keys=sync.curve_keys,
        replication=sync.replication,
        replica=replica, partner=partner, failover_s=sync.failover_s, insecure_bind=sync.insecure_bind or insecure,
        max_message_bytes=sync.message_limit()))


def run_worker_node(config: str, workers: int, rank: int, servers: Sequence[str], backups: Sequence[str] = (),
                    run_dir: str | None = None, wait_start: bool = False, overrides: Sequence[str] = ()) -> None:
    """Train as worker `rank` against `servers` (replica-0 endpoints in index order; with sync.replication = 2 the
    replica-1 ones in `backups`), then end the process. Raises ValueError, naming the option, for endpoints or a
    rank that do not fit the config."""
    from plait.ps.trainer import WorkerDiverged, run_worker

    cfg = load_node_config(config, overrides, workers)
    if len(servers) != cfg.sync.servers:
        raise ValueError(f"--servers lists {len(servers)} endpoints, sync.servers = {cfg.sync.servers}")
    if len(backups) != (cfg.sync.servers if cfg.sync.replication > 1 else 0):
        raise ValueError(f"--backups lists {len(backups)} endpoints; sync.replication = {cfg.sync.replication} "
                         "needs one per server with replication 2, none with 1")
    if not 0 <= rank < workers:
        raise ValueError(f"--rank {rank} outside 0..{workers - 1}")
    out = Path(run_dir) if run_dir else Path(cfg.run.root) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_worker(cfg, rank, workers, list(servers), out, start_barrier=wait_start, backups=list(backups))
        code = 0
    except WorkerDiverged as err:  # its record is in worker-<rank>.jsonl; the launcher stops the run
        print(err, file=sys.stderr)
        code = 1
    # The work is done and its logs are closed: skip the interpreter's teardown of torch (seconds on a busy
    # machine), so the launcher sees the worker finish when it did.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def create_pieces_node(config: str, workers: int, servers: Sequence[str], backups: Sequence[str] = (),
                       overrides: Sequence[str] = ()) -> None:
    """Store the model's initial pieces on the servers, as the local launcher does before any worker starts; with
    sync.curve_keys only the launcher's key may (trust.py), so this presents it."""
    from plait.ps.trainer import create_pieces

    cfg = load_node_config(config, overrides, workers)
    if len(servers) != cfg.sync.servers:
        raise ValueError(f"--servers lists {len(servers)} endpoints, sync.servers = {cfg.sync.servers}")
    create_pieces(cfg, list(servers), list(backups))


def run_server_from_config(**fields: object) -> None:
    """Serve with the `ServerConfig` these fields make (as `settings.config.to_dict` wrote them)."""
    from plait.ps.server import run_server
    from plait.ps.server_config import ServerConfig

    run_server(from_dict(ServerConfig, dict(fields)))


ROLES: dict[str, Callable[..., None]] = {"server": run_server_node, "worker": run_worker_node,
                                         "server-config": run_server_from_config}


def node_command(role: str, **arguments: object) -> list[str]:
    """The command line that starts one process of `role` with these keyword arguments (the launcher's)."""
    return [sys.executable, "-m", "plait.ps.node", role, json.dumps(arguments)]


def signal_on_parent_death(signum: int) -> bool:
    """Linux: have the kernel send this process `signum` when its parent dies, even by SIGKILL. False where that
    cannot be set (another system, no libc): a dead parent's processes must then be ended by hand."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        return False
    return True


def end_with_parent() -> None:
    """When the local launcher that started this process (its pid in PARENT_ENV) dies, even by SIGKILL, the kernel
    sends this one SIGTERM (a server writes its final checkpoint and exits, a worker ends), so a killed launcher
    leaves nothing running. Set here, after exec, rather than before it: the launcher has threads."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not signal_on_parent_death(signal.SIGTERM):
        return
    if os.getppid() != int(parent):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    end_with_parent()
    role, arguments = argv if argv is not None else sys.argv[1:]
    ROLES[role](**json.loads(arguments))  # an error's traceback goes to the process's log under logs/


if __name__ == "__main__":
    main()
