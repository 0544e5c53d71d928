"""Parameter servers on this machine for a training loop of your own: each server its own process, their endpoints
handed to your workers' `KVStore`s.

    with local_servers(2, num_workers=4, optimizer=OptimizerConfig(name="sgd", lr=0.1)) as endpoints:
        ...  # in each worker: kv = KVStore(endpoints, worker=rank); kv.init / pushpull / pull, your loop

The servers are the ones `plait ps server` and `plait train` run (started through plait/ps/node.py, so they load
no torch and start in a fraction of a second); on several hosts, start `plait ps server` on each instead. Leaving
the block stops them with SIGTERM: each writes a final checkpoint to `state_dir` and exits.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plait.ps.consistency import Consistency
from plait.ps.node import node_command
from plait.ps.optim import OptimizerConfig
from plait.ps.server_config import ServerConfig
from plait.settings.config import to_dict


@contextmanager
def local_servers(count: int, num_workers: int, *, consistency: str = "bsp",
                  optimizer: OptimizerConfig | None = None, state_dir: str | Path | None = None,
                  host: str = "127.0.0.1", startup_timeout_s: float = 60.0) -> Iterator[list[str]]:
    """Start `count` servers for `num_workers` workers under `consistency` ("bsp", "ssp:S" or "asp"), each on a
    free port of `host`; yields their endpoints in index order (what `KVStore` takes). Checkpoints, endpoint files
    and each server's event log and output go to `state_dir` (default: a temporary directory, removed after)."""
    if count < 1:
        raise ValueError(f"local_servers: count must be >= 1, got {count}")
    try:
        model = Consistency.from_setting(consistency)
    except ValueError as err:
        raise ValueError(f"local_servers: consistency = {consistency!r}: {err}") from None
    temporary = None
    if state_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="plait-ps-")
        state_dir = temporary.name
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    configs = [ServerConfig(index=index, endpoint=f"tcp://{host}:0", num_workers=num_workers, consistency=model,
                            optimizer=optimizer or OptimizerConfig(), checkpoint_every=0, state_dir=str(directory),
                            resume=False) for index in range(count)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for config in configs:
            config.endpoint_path.unlink(missing_ok=True)
            with open(directory / f"{config.name}.out", "ab") as out:
                processes.append(subprocess.Popen(node_command("server-config", **to_dict(config)), stdout=out,
                                                  stderr=subprocess.STDOUT))
        yield [_await_endpoint(config, process, startup_timeout_s) for config, process in zip(configs, processes)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()  # SIGTERM: a final checkpoint, then exit
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if temporary is not None:
            temporary.cleanup()


def _await_endpoint(config: ServerConfig, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not config.endpoint_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            output = (Path(config.state_dir) / f"{config.name}.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"ps {config.name} did not start (stage: launch):\n{output}")
        time.sleep(0.02)
    return config.endpoint_path.read_text().strip()
