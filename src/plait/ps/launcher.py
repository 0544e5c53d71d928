"""Start servers and workers on localhost as separate processes, supervise them, evaluate the model as it trains.

The launcher (ps-lite's local.sh, in Python) runs `python -m plait.ps.node server|worker ...` for each process: the
functions `plait ps server|worker` run, so a local run and a multi-host run start the same programs. It is handed
its run (`plait.runtime.context.RunContext`) by the driver (plait/experiment/runs/parameter_server.py) and keeps its
own files under the run's path: servers/ (checkpoints, endpoints, event logs), logs/, worker-<r>.jsonl,
summary.json. Under sync.curve_keys it first issues each worker a key bound to its worker id (security.py, trust.py)
where the key directory lacks one. While the workers train it:

- restarts a server that died, on the same endpoint, from its checkpoint (workers reconnect and resend); with
  sync.replication = 2 it runs two processes per server (replica 0, then replica 1 of each range; process p is
  server p mod S, replica p // S), and a restarted one catches up from its live partner instead;
- restarts a worker that died (sync.max_worker_restarts times): it resumes at the clock the servers recorded for
  it, or, if they had dropped it meanwhile (sync.worker_timeout_s), at the slowest other worker's; past the limit
  it is noted as failed and the others carry on without it;
- every train.eval_every_s pulls the weights as an *observer* (never counted in the clocks) and scores them on a
  fixed test subset: these records (test_loss, test_accuracy, time, ...) are the run's records;
- injects the configured faults (SIGKILL a server at a step, or each server process in turn);
- on SIGTERM or SIGINT stops the workers, asks every server for a final checkpoint (SHUTDOWN) and returns a summary
  that names the signal: `--resume` goes on from there;
- with sync.status_port >= 0, serves a live dashboard of all this (dashboard.py) on sync.status_host.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from plait.ps.checkpoint import checkpointed_clock
from plait.ps.config import PSRunConfig
from plait.ps.consistency import NO_LIVE_WORKER
from plait.ps.dashboard import Dashboard, Processes
from plait.ps.divergence import WorkerDiverged, divergence_record
from plait.ps.kvstore import KVStore
from plait.ps.node import node_command
from plait.ps.security import LAUNCHER, CurveKeys, issue_worker_keys
from plait.ps.server_config import server_name
from plait.ps.summary import ClusterSummary, test_metrics_text
from plait.ps.trainer import PARAMS_KEY, RESTART_ENV, build_flat_model, create_pieces, evaluate, load_test
from plait.ps.transport import WorkerTransport
from plait.ps.wire import Header, Op
from plait.runtime.context import RunContext
from plait.runtime.metrics_log import read_metrics

STARTUP_TIMEOUT_S = 60.0
SERVERS_DIR = "servers"  # under the run's path: the servers' checkpoints, endpoint files and event logs


def server_checkpoints(run_path: Path, journals: bool = False) -> list[Path]:
    """The server checkpoints a run directory holds (with `journals`, also the write-ahead journals a server
    replays after its checkpoint, or alone when it died before its first): what `--resume` goes on from."""
    found = list((Path(run_path) / SERVERS_DIR).glob("server-*.npz"))
    if journals:
        found += [j for j in (Path(run_path) / SERVERS_DIR).glob("server-*.journal") if j.stat().st_size]
    return sorted(found)


class StoppedBySignal(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalCluster:
    """`config_path` is the resolved config the processes read (the driver wrote it); the records, the progress
    (over the slowest worker's clock, as the evaluator sees it) and resume come from `run`."""

    def __init__(self, config: PSRunConfig, config_path: Path, run: RunContext, num_workers: int,
                 timeout_s: float = 3600.0):
        config.check_workers(num_workers)
        self.config, self.config_path, self.ctx = config, Path(config_path), run
        self.run_dir = run.path
        self.num_workers, self.resume, self.timeout_s = num_workers, run.resume, timeout_s
        self.state_dir = self.run_dir / SERVERS_DIR
        self.logs_dir = self.run_dir / "logs"
        self.servers: list[subprocess.Popen] = []       # one per server process: replica r of server i is r*S + i
        self.workers: list[subprocess.Popen] = []
        self.endpoints: list[str] = []                  # every server process's, in the same order
        self.num_processes = config.sync.servers * config.sync.replication
        self.restarts = [0] * self.num_processes
        self.restarted_at = [0.0] * self.num_processes  # wall time of each process's last restart
        self.worker_restarts = [0] * num_workers
        self.failed_workers: list[int] = []             # past sync.max_worker_restarts: the others go on without
        self.dashboard: Dashboard | None = None         # sync.status_port >= 0: the live page, while `run` runs
        self._files: list = []

    # -- processes ----------------------------------------------------------------------------------------------
    def _spawn(self, role: str, arguments: dict[str, Any], log_name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs_dir / log_name, "ab")
        self._files.append(log)
        cmd = node_command(role, config=str(self.config_path), workers=self.num_workers, **arguments)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def primaries(self) -> list[str]:
        return self.endpoints[:self.config.sync.servers]

    @property
    def backups(self) -> list[str]:
        return self.endpoints[self.config.sync.servers:]

    def _name(self, process: int) -> str:
        return server_name(process % self.config.sync.servers, process // self.config.sync.servers)

    def _start_worker(self, rank: int, restart: int = 0) -> subprocess.Popen:
        # A restart joins the start barrier too: if its first life died before saying ready, the others are still
        # waiting there (once the start is given, the barrier lets it through at once).
        arguments = {"rank": rank, "servers": self.primaries, "backups": self.backups, "run_dir": str(self.run_dir),
                     "wait_start": True}
        return self._spawn("worker", arguments, f"worker-{rank}.log", env={RESTART_ENV: str(restart)})

    def _start_server(self, process: int, bind: str, fresh: bool) -> subprocess.Popen:
        servers = self.config.sync.servers
        arguments = {"index": process % servers, "replica": process // servers, "bind": bind,
                     "state_dir": str(self.state_dir), "fresh": fresh}
        return self._spawn("server", arguments, f"{self._name(process)}.log")

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for stale in [self.run_dir / "start", *self.run_dir.glob("ready-*")]:
            stale.unlink(missing_ok=True)
        if self.config.sync.curve_keys:  # each worker's own key, bound to its id, before the servers read the keys
            try:
                issue_worker_keys(self.config.sync.curve_keys, self.num_workers)
            except OSError as err:  # e.g. a read-only key directory: the run goes on with the keys it has
                print(f"warning: no worker keys issued into sync.curve_keys ({err}); workers without their own key "
                      "use client.key", file=sys.stderr, flush=True)
        for process in range(self.num_processes):
            (self.state_dir / f"{self._name(process)}.endpoint").unlink(missing_ok=True)
            self.servers.append(self._start_server(process, f"tcp://{self.config.sync.host}:0",
                                                   fresh=not self.resume))
        self.endpoints = [self._await_endpoint(process) for process in range(self.num_processes)]
        try:
            create_pieces(self.config, self.primaries, self.backups)  # with CurveZMQ only the launcher's key may
        except (RuntimeError, TimeoutError):  # e.g. a resumed run whose pieces differ: no server left behind
            self.stop()
            raise
        self.workers = [self._start_worker(rank) for rank in range(self.num_workers)]

    def _await_endpoint(self, process: int) -> str:
        path = self.state_dir / f"{self._name(process)}.endpoint"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not path.exists():
            if self.servers[process].poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ps {self._name(process)} did not start (stage: launch):\n"
                                   f"{_tail(self.logs_dir / f'{self._name(process)}.log')}")
            time.sleep(0.02)
        return path.read_text().strip()

    def kill_server(self, process: int) -> None:
        """SIGKILL server process `process` (replica r of server i is r*S + i; without replication, server i)."""
        os.kill(self.servers[process].pid, signal.SIGKILL)
        self.servers[process].wait()

    def _recovered(self, process: int) -> bool:
        """The process is up again since its last restart: listening, and with replication caught up from its
        partner (or serving, if both had restarted)."""
        if self.servers[process].poll() is not None:
            return False
        wanted = {"synced", "serving"} if self.config.sync.replication > 1 else {"listening"}
        return any(e.get("event") in wanted and e.get("time", 0) >= self.restarted_at[process]
                   for e in read_metrics(self.state_dir / f"{self._name(process)}.jsonl"))

    def _supervise_servers(self) -> None:
        for process, proc in enumerate(self.servers):
            if proc.poll() is None:
                continue
            name = self._name(process)
            if self.restarts[process] >= self.config.sync.max_server_restarts:
                self.stop()
                raise RuntimeError(f"ps {name} died {self.restarts[process] + 1} times "
                                   f"(sync.max_server_restarts = {self.config.sync.max_server_restarts}):\n"
                                   f"{_tail(self.logs_dir / f'{name}.log')}")
            self.restarts[process] += 1
            self.restarted_at[process] = time.time()
            self.servers[process] = self._start_server(process, self.endpoints[process], fresh=False)
            replica = {"replica": process // self.config.sync.servers} if self.config.sync.replication > 1 else {}
            self._write({"event": "server_restarted", "server": process % self.config.sync.servers, **replica,
                         "exit_code": proc.returncode, "time": time.time()})

    def _write(self, record: dict[str, Any]) -> None:
        """A record of the run; the dashboard shows it too."""
        self.ctx.write(record)
        if self.dashboard is not None:
            self.dashboard.feed.note(record)

    def _show(self, phase: str, force: bool = False) -> None:
        """Publish the dashboard's next snapshot when one is due (every dashboard.PUBLISH_EVERY_S), or `force`."""
        if self.dashboard is not None and (force or self.dashboard.due()):
            self.dashboard.publish(phase, Processes(
                [p.poll() is None for p in self.workers], list(self.worker_restarts), list(self.failed_workers),
                [p.poll() is None for p in self.servers], list(self.restarts)))

    def _supervise_workers(self, failed: list[int]) -> bool:
        """Restart the workers that died (up to sync.max_worker_restarts each), note those past the limit as
        failed; True while any worker is still running."""
        for rank, proc in enumerate(self.workers):
            if proc.poll() in (None, 0) or rank in failed:
                continue
            if (diverged := divergence_record(self.run_dir, rank)) is not None:  # no restart: the same step again
                self.ctx.write(diverged)
                raise WorkerDiverged(f"{diverged['reason']}. The servers' checkpoints in {self.state_dir} hold the "
                                     "last good state (written as the run stops): continue with --resume")
            if self.worker_restarts[rank] < self.config.sync.max_worker_restarts:
                self.worker_restarts[rank] += 1
                self.workers[rank] = self._start_worker(rank, restart=self.worker_restarts[rank])
                self._write({"event": "worker_restarted", "worker": rank, "exit_code": proc.returncode,
                            "time": time.time()})
            else:
                failed.append(rank)
                self._write({"event": "worker_failed", "worker": rank, "exit_code": proc.returncode,
                            "time": time.time()})
        return any(p.poll() is None for p in self.workers)

    def _catch_signals(self) -> dict:
        """SIGTERM and SIGINT end the run cleanly (see `run`); only the main thread can set handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        stopping = []

        def on_signal(signum: int, _frame) -> None:
            if not stopping:  # the first one stops the run; the shutdown that follows is not interrupted again
                stopping.append(signum)
                raise StoppedBySignal(signum)

        return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _stop_workers(self, grace_s: float = 5.0) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.workers:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for proc in self.workers + self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()
        self._files.clear()

    def _shutdown_servers(self) -> None:
        """Ask each server for a final checkpoint and exit; kill those that do not answer."""
        transport = WorkerTransport(curve=CurveKeys.from_setting(self.config.sync.curve_keys, LAUNCHER))
        transport.connect(self.endpoints)
        for index in range(len(self.endpoints)):
            transport.send_msg(index, Header(Op.SHUTDOWN, req=index + 1))
        deadline = time.monotonic() + 10.0
        while any(p.poll() is None for p in self.servers) and time.monotonic() < deadline:
            transport.recv_msg(0.05)
        transport.close()
        self.stop()

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
        kills = self.config.fault.kill_plan(self.config.sync.servers, self.num_processes)
        started_workers = False
        last: dict[str, Any] = {}
        next_eval = 0.0
        stopped_by = None
        previous_handlers = self._catch_signals()
        try:
            while self._supervise_workers(failed):
                if time.perf_counter() - started > self.timeout_s:
                    raise TimeoutError(f"ps run {cfg.run.name}: not finished after {self.timeout_s} s")
                self._supervise_servers()
                if not started_workers and all((self.run_dir / f"ready-{rank}").exists() or proc.poll() is not None
                                               for rank, proc in enumerate(self.workers)):
                    (self.run_dir / "start").touch()  # every worker is up: start them together
                    started_workers = True
                self._show("training" if started_workers else "waiting for the workers to start")
                if time.perf_counter() >= next_eval:
                    next_eval = time.perf_counter() + cfg.train.eval_every_s
                    record = self._evaluate(observer, model, weights, spec, test, started)
                    if record is not None:
                        self._write(record)
                        last = record
                        self.ctx.progress(record["step"], test_metrics_text(record) or "no test set")
                        if time_to_target is None and cfg.train.target_loss and \
                                record.get("test_loss", math.inf) <= cfg.train.target_loss:
                            time_to_target = record["elapsed_s"]
                        self._inject_kill(kills, record["step"])
                time.sleep(0.01)
            self._supervise_servers()
            self._show("final evaluation", force=True)
            final = self._evaluate(observer, model, weights, spec, test, started, attempts=10)
            if final is not None:
                self._write(final)
                last = final
                if time_to_target is None and cfg.train.target_loss and \
                        final.get("test_loss", math.inf) <= cfg.train.target_loss:
                    time_to_target = final["elapsed_s"]
        except StoppedBySignal as stopped:
            # Workers first (nothing changes after the servers' checkpoints), then SHUTDOWN: final checkpoints.
            stopped_by = str(stopped)
            self._stop_workers()
            self._write({"event": "stopped_by_signal", "signal": stopped_by, "step": last.get("step"),
                         "time": time.time()})
        finally:
            observer.close(goodbye=False)
            if self.endpoints:
                self._shutdown_servers()
            self.stop()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        staleness = {}
        for rank in range(self.num_workers):
            records = read_metrics(self.run_dir / f"worker-{rank}.jsonl")
            staleness[rank] = max((r.get("staleness", 0) for r in records), default=0)
        restarted = {rank: n for rank, n in enumerate(self.worker_restarts) if n}
        summary = ClusterSummary(self.run_dir, time.perf_counter() - started, last, time_to_target,
                                 sum(self.restarts), failed, staleness, weights.numpy().copy(), restarted, stopped_by)
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

    def _inject_kill(self, kills: list[tuple[int, int]], step: int) -> None:
        if not kills or step < kills[0][0]:
            return
        if any(self.restarts[p] and not self._recovered(p) for p in range(self.num_processes)):
            return  # one failure at a time: the last one killed is not back yet
        _, process = kills.pop(0)
        self.kill_server(process)
        replica = {"replica": process // self.config.sync.servers} if self.config.sync.replication > 1 else {}
        self._write({"event": "server_killed", "server": process % self.config.sync.servers, **replica,
                     "step": step, "time": time.time()})

    def _evaluate(self, observer: KVStore, model, weights: torch.Tensor, spec, test, started: float,
                  attempts: int = 1) -> dict[str, Any] | None:
        for _ in range(attempts):
            try:
                observer.wait(observer.pull(PARAMS_KEY, weights))
                break
            except TimeoutError:
                observer.cancel_all()  # a server is down; the supervisor restarts it, try again later
                self._supervise_servers()
            except RuntimeError:
                observer.cancel_all()  # the workers have not initialised the weights yet
                return None
        else:
            return None
        metrics = evaluate(model, spec, weights, test, self.config.train.task)
        slowest = observer.stats.last_slowest
        step = self.config.train.steps - 1 if slowest >= NO_LIVE_WORKER else slowest
        return {"step": step + 1, **metrics, "lr": self.config.optimizer.lr,
                "elapsed_s": time.perf_counter() - started, "time": time.time(), "server_restarts": sum(self.restarts)}
