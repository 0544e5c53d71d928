"""The part of a parameter-server run that decides it, wherever its processes run: create the model's pieces,
release the workers together, evaluate as an observer, write the run's records, end the run (SHUTDOWN: the servers'
final checkpoints) and sum it up.

Two kinds of `Nodes` start and supervise the processes: the local launcher's (launcher.py: subprocesses of this
one) and torchrun's (torchrun_roles.py: supervisor ranks on any host, reached through torchrun's store). The
coordinator only asks them what it needs: endpoints, which workers are ready, running or done, restarts to record.
On SIGTERM or SIGINT (a flag its loop reads between steps: stop_signals.py) it stops the workers, asks every server
for a final checkpoint (terminating, then killing, any that does not end in time) and returns a summary that names
the signal: `--resume` goes on from there.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from plait.ps.checkpoint import checkpointed_clock
from plait.ps.config import PSRunConfig
from plait.ps.consistency import NO_LIVE_WORKER
from plait.ps.dashboard import Dashboard, Processes
from plait.ps.kvstore import KVStore
from plait.ps.security import LAUNCHER, CurveKeys, issue_worker_keys
from plait.ps.stop_signals import StopSignals
from plait.ps.summary import ClusterSummary, test_metrics_text
from plait.ps.trainer import PARAMS_KEY, build_flat_model, create_pieces, evaluate, load_test
from plait.ps.transport import WorkerTransport
from plait.ps.wire import Header, Op
from plait.runtime.context import RunContext
from plait.runtime.metrics_log import read_metrics

SERVERS_DIR = "servers"  # under the run's path: the servers' checkpoints, endpoint files and event logs
SHUTDOWN_WAIT_S = 10.0   # how long the servers have to write their final checkpoints after SHUTDOWN
TERMINATE_WAIT_S = 5.0   # then, for those still running, from SIGTERM (a checkpoint, had SHUTDOWN been lost) to SIGKILL


def server_checkpoints(run_path: Path, journals: bool = False) -> list[Path]:
    """The server checkpoints a run directory holds (with `journals`, also the write-ahead journals a server
    replays after its checkpoint, or alone when it died before its first): what `--resume` goes on from."""
    found = list((Path(run_path) / SERVERS_DIR).glob("server-*.npz"))
    if journals:
        found += [j for j in (Path(run_path) / SERVERS_DIR).glob("server-*.journal") if j.stat().st_size]
    return sorted(found)


def time_at_target(record: dict[str, Any], so_far: float | None, target_loss: float) -> float | None:
    """`so_far`, or `record`'s elapsed time when it is the first evaluation at or under `target_loss` (0: none)."""
    if so_far is None and target_loss and record.get("test_loss", math.inf) <= target_loss:
        return float(record["elapsed_s"])
    return so_far


class Nodes(Protocol):
    """The servers and workers of a run, started and supervised for the coordinator."""
    endpoints: list[str]          # every server process's: replica r of server i is r*S + i
    note: Callable[[dict[str, Any]], None]  # where the nodes' events go (the coordinator's records)

    def start_servers(self) -> None: ...            # until every endpoint is known
    def start_workers(self) -> None: ...            # once the pieces exist
    def supervise_servers(self) -> None: ...        # restart a dead one; raise past sync.max_server_restarts
    def supervise_workers(self, failed: list[int]) -> bool: ...  # True while any worker runs; raise on divergence
    def workers_ready(self) -> bool: ...            # every worker waits at the start barrier (or died)
    def release_workers(self) -> None: ...
    def server_restarts(self) -> int: ...
    def inject_faults(self, step: int) -> None: ...
    def processes(self) -> Processes: ...
    def stop_workers(self) -> None: ...
    def servers_running(self) -> bool: ...          # after SHUTDOWN: whether any still runs
    def stop(self, grace_s: float = 0.0) -> None: ...  # end what still runs: SIGTERM, SIGKILL after grace_s
    def worker_log(self, rank: int) -> Path: ...


class Coordinator:
    def __init__(self, config: PSRunConfig, run: RunContext, nodes: Nodes, num_workers: int,
                 timeout_s: float = 3600.0):
        self.config, self.ctx, self.nodes = config, run, nodes
        self.run_dir, self.resume = run.path, run.resume
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.failed_workers: list[int] = []
        self.dashboard: Dashboard | None = None
        nodes.note = self._write

    @property
    def primaries(self) -> list[str]:
        return self.nodes.endpoints[:self.config.sync.servers]

    @property
    def backups(self) -> list[str]:
        return self.nodes.endpoints[self.config.sync.servers:]

    def start(self) -> None:
        for stale in [self.run_dir / "start", *self.run_dir.glob("ready-*")]:
            stale.unlink(missing_ok=True)
        if self.config.sync.curve_keys:  # each worker's own key, bound to its id, before the servers read the keys
            try:
                issue_worker_keys(self.config.sync.curve_keys, self.num_workers)
            except OSError as err:  # e.g. a read-only key directory: the run goes on with the keys it has
                print(f"warning: no worker keys issued into sync.curve_keys ({err}); workers without their own key "
                      "use client.key", file=sys.stderr, flush=True)
        self.nodes.start_servers()
        try:
            create_pieces(self.config, self.primaries, self.backups)  # with CurveZMQ only the launcher's key may
        except (RuntimeError, TimeoutError):  # e.g. a resumed run whose pieces differ: no server left behind
            self.nodes.stop()
            raise
        self.nodes.start_workers()

    def _write(self, record: dict[str, Any]) -> None:
        """A record of the run; the dashboard shows it too."""
        self.ctx.write(record)
        if self.dashboard is not None:
            self.dashboard.feed.note(record)

    def _show(self, phase: str, force: bool = False) -> None:
        """Publish the dashboard's next snapshot when one is due (every dashboard.PUBLISH_EVERY_S), or `force`."""
        if self.dashboard is not None and (force or self.dashboard.due()):
            self.dashboard.publish(phase, self.nodes.processes())

    def _shutdown_servers(self) -> None:
        """Ask each server for a final checkpoint and exit; terminate, then kill, those still running after
        SHUTDOWN_WAIT_S (one that never got the message, or is stuck): every wait is bounded."""
        transport = WorkerTransport(curve=CurveKeys.from_setting(self.config.sync.curve_keys, LAUNCHER))
        transport.connect(self.nodes.endpoints)
        for index in range(len(self.nodes.endpoints)):
            transport.send_msg(index, Header(Op.SHUTDOWN, req=index + 1))
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while self.nodes.servers_running() and time.monotonic() < deadline:
            transport.recv_msg(0.05)
        transport.close()
        self.nodes.stop(grace_s=TERMINATE_WAIT_S)

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> ClusterSummary:
        cfg = self.config
        model, weights, spec = build_flat_model(cfg)
        test = load_test(cfg)  # None: the user's data has no test split (the records then carry no test metrics)
        started = time.perf_counter() - self.ctx.start(self._resumed_step())  # elapsed_s goes on after a resume
        if cfg.sync.status_port >= 0:
            started_unix = time.time() - (time.perf_counter() - started)  # when elapsed_s was 0
            self.dashboard = Dashboard(cfg, self.run_dir, self.num_workers, started_unix)
            print(f"ps dashboard: {self.dashboard.serve()}", flush=True)
        try:
            self._show("starting servers", force=True)
            return self._train(model, weights, spec, test, started)
        finally:
            if self.dashboard is not None:
                self.dashboard.close()

    def _train(self, model: torch.nn.Module, weights: torch.Tensor, spec: Any, test: Any,
               started: float) -> ClusterSummary:
        cfg = self.config
        self.start()
        self._show("waiting for the workers to start", force=True)
        observer = KVStore(self.primaries, -1, observer=True, retry_s=0.5, timeout_s=2.0,
                           piece_numel=cfg.sync.piece_numel, curve_keys=cfg.sync.curve_keys,
                           backups=self.backups or None)
        observer.init(PARAMS_KEY, weights)
        failed = self.failed_workers
        time_to_target = None
        started_workers = False
        last: dict[str, Any] = {}
        next_eval = 0.0
        stopped_by = None  # a signal that came before the run's end (one during its shutdown changes nothing)
        # A signal only sets `stop.signum`; the loop reads it between its steps (stop_signals.py says why).
        with StopSignals() as stop:
            try:
                while stop.signum is None and self.nodes.supervise_workers(failed):
                    if time.perf_counter() - started > self.timeout_s:
                        raise TimeoutError(f"ps run {cfg.run.name}: not finished after {self.timeout_s} s")
                    self.nodes.supervise_servers()
                    if not started_workers and self.nodes.workers_ready():
                        self.nodes.release_workers()  # every worker is up: start them together
                        started_workers = True
                    self._show("training" if started_workers else "waiting for the workers to start")
                    if time.perf_counter() >= next_eval:
                        next_eval = time.perf_counter() + cfg.train.eval_every_s
                        record = self._evaluate(observer, model, weights, spec, test, started)
                        if record is not None:
                            self._write(record)
                            last = record
                            self.ctx.progress(record["step"], test_metrics_text(record) or "no test set")
                            time_to_target = time_at_target(record, time_to_target, cfg.train.target_loss)
                            self.nodes.inject_faults(record["step"])
                    time.sleep(0.01)
                if stop.signum is None:
                    self.nodes.supervise_servers()
                    self._show("final evaluation", force=True)
                    final = self._evaluate(observer, model, weights, spec, test, started, attempts=10, stop=stop)
                    if final is not None:
                        self._write(final)
                        last = final
                        time_to_target = time_at_target(final, time_to_target, cfg.train.target_loss)
                if stop.signum is not None:
                    # Workers first (nothing changes after the servers' checkpoints), then SHUTDOWN: final checkpoints.
                    stopped_by = stop.name
                    self.nodes.stop_workers()
                    self._write({"event": "stopped_by_signal", "signal": stopped_by, "step": last.get("step"),
                                 "time": time.time()})
            finally:
                observer.close(goodbye=False)
                if self.nodes.endpoints:
                    self._shutdown_servers()
                self.nodes.stop()
        return self._summary(started, last, time_to_target, stopped_by, weights)

    def _summary(self, started: float, last: dict[str, Any], time_to_target: float | None, stopped_by: str | None,
                 weights: torch.Tensor) -> ClusterSummary:
        failed = self.failed_workers
        staleness = {}
        for rank in range(self.num_workers):
            records = read_metrics(self.nodes.worker_log(rank))
            staleness[rank] = max((r.get("staleness", 0) for r in records), default=0)
        restarted = {rank: n for rank, n in enumerate(self.nodes.processes().worker_restarts) if n}
        summary = ClusterSummary(self.run_dir, time.perf_counter() - started, last, time_to_target,
                                 self.nodes.server_restarts(), failed, staleness, weights.numpy().copy(), restarted,
                                 stopped_by)
        (self.run_dir / "summary.json").write_text(json.dumps({
            "elapsed_s": summary.elapsed_s, "final": last, "time_to_target_s": time_to_target, "stopped_by": stopped_by,
            "server_restarts": summary.server_restarts, "failed_workers": failed,
            "worker_restarts": {str(k): v for k, v in restarted.items()},
            "max_staleness": {str(k): v for k, v in staleness.items()}}, indent=2))
        self._show("done" if stopped_by is None else f"stopped by {stopped_by}", force=True)
        return summary

    def _resumed_step(self) -> int:
        """Where the evaluator's records go on from: on resume, the furthest clock any server checkpointed (a record
        past it came from state the servers lost, and is redone); 0 on a fresh run."""
        if not self.resume:
            return 0
        return max((checkpointed_clock(path) + 1 for path in server_checkpoints(self.run_dir)), default=0)

    def _evaluate(self, observer: KVStore, model, weights: torch.Tensor, spec, test, started: float,
                  attempts: int = 1, stop: StopSignals | None = None) -> dict[str, Any] | None:
        for _ in range(attempts):
            if stop is not None and stop.signum is not None:
                return None  # a signal came during the final evaluation: the run stops without it
            try:
                observer.wait(observer.pull(PARAMS_KEY, weights))
                break
            except TimeoutError:
                observer.cancel_all()  # a server is down; its supervisor restarts it, try again later
                self.nodes.supervise_servers()
            except RuntimeError:
                observer.cancel_all()  # the workers have not initialised the weights yet
                return None
        else:
            return None
        metrics = evaluate(model, spec, weights, test, self.config.train.task)
        slowest = observer.stats.last_slowest
        step = self.config.train.steps - 1 if slowest >= NO_LIVE_WORKER else slowest
        return {"step": step + 1, **metrics, "lr": self.config.optimizer.lr, "elapsed_s": time.perf_counter() - started,
                "time": time.time(), "server_restarts": self.nodes.server_restarts()}
