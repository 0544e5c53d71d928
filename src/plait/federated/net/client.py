"""The network client: `plait fl client --server HOST:PORT --data CONFIG.toml --id K`.

It dials out (so it may sit behind NAT), registers with its device properties, beats from a background thread,
long-polls for its task, runs the same client program as the simulator (`client_program.py`: train, clip, noise,
compress) on its own partition (taken by --id from the [data] section), and streams the update back; an evaluation
task is answered with the accuracy and loss on its held-out data. Lost connections are retried with jittered
exponential backoff,
re-registering each time, so clients ride out a server restart by themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from plait.data.federated import load_own_data
from plait.federated.client_program import ClientProgram
from plait.federated.client_update import ClientData
from plait.federated.device import on_device
from plait.federated.evaluate import evaluate
from plait.federated.net import plait_fl_pb2 as pb
from plait.federated.net.auth import read_key
from plait.federated.net.config import LOOPBACK, NetworkRunConfig, client_device
from plait.federated.net.connection import Connection, SecAggTask, Task
from plait.federated.net.pipeline import pipeline_fingerprint
from plait.federated.net.tls import client_credentials
from plait.federated.net.trainee import Trainee, imported_trainee, shipped_trainee
from plait.federated.secagg import messages
from plait.federated.secagg.protocol import SecAggError
from plait.federated.seeds import BACKOFF_JITTER, stream

log = logging.getLogger("plait.fl.client")

# Failures worth retrying: the server is down, restarting, or the link dropped.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}
EXIT_DONE, EXIT_GAVE_UP, EXIT_REFUSED = 0, 1, 3


@dataclass(kw_only=True, slots=True)
class ClientOptions:
    server: str                       # HOST:PORT
    client_id: int
    cert_dir: str = ""                # from `plait fl certs`: ca.pem and clients/client-<id>.*
    data_path: str = ""               # this client's own data: a .npz (x, y) or a folder with data.npz
    key_file: str = ""                # HMAC key (default: cert_dir/clients/client-<id>.key)
    tls: bool | None = None           # None: on unless the server is a loopback address
    properties: dict[str, bool] = field(default_factory=lambda: {"charging": True, "idle": True,
                                                                 "unmetered": True})
    slow_s: float = 0.0               # extra seconds before each push (simulates a slow device)
    max_retry_s: float = 120.0        # give up after the server is unreachable this long
    backoff_s: float = 0.25           # first retry delay; doubles up to backoff_max_s
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.client_id < 0:
            raise ValueError(f"--id must be >= 0, got {self.client_id}")
        if ":" not in self.server:
            raise ValueError(f"--server must be HOST:PORT, got {self.server!r}")
        if self.slow_s < 0 or self.max_retry_s <= 0 or self.backoff_s <= 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError("--slow-s must be >= 0; --max-retry-s, backoff must be > 0")

    @property
    def host(self) -> str:
        return self.server.rsplit(":", 1)[0].strip("[]")


def uses_tls(opts: ClientOptions, net_tls: str) -> bool:
    """TLS as the command line says (--tls/--no-tls), else as the config's net.tls says (auto: on unless the server
    is a loopback address) — the same rule as the server's."""
    if opts.tls is not None:
        return opts.tls
    return net_tls == "on" or (net_tls == "auto" and opts.host not in LOOPBACK)


def connect(opts: ClientOptions, chunk_bytes: int, net_tls: str = "auto") -> Connection:
    key = None
    key_path = opts.key_file or (Path(opts.cert_dir) / "clients" / f"client-{opts.client_id}.key"
                                 if opts.cert_dir else "")
    if key_path:
        key = read_key(key_path, f"client {opts.client_id}")
    use_tls = uses_tls(opts, net_tls)
    credentials = None
    if use_tls:
        if not opts.cert_dir:
            raise ValueError("TLS is on (net.tls in the config, or --tls) and needs --certs DIR (with ca.pem); "
                             "turn it off with --no-tls only for a server without TLS")
        credentials = client_credentials(opts.cert_dir, opts.client_id)
    return Connection(opts.server, opts.client_id, key, credentials, chunk_bytes)


class NetClient:
    def __init__(self, config: NetworkRunConfig, opts: ClientOptions):
        self.config, self.opts = config, opts
        torch.set_num_threads(config.run.threads or 1)
        # Only this client's own data: its own file, its loader's share, or (one machine) its partition.
        train, held_out, num_classes = load_own_data(config.data, opts.client_id, opts.data_path)
        self.device = client_device(config.net.client_device)
        self.data = ClientData(on_device(train.x, self.device), train.y.to(self.device))
        # held out, for federated evaluation
        self.eval_data = ClientData(on_device(held_out.x, self.device), held_out.y.to(self.device))
        # The model, its task and flat layout: imported now, or (net.ship_program) the server's, once registered.
        self.trainee = None if config.net.ship_program else imported_trainee(config, self.data, num_classes,
                                                                            self.device)
        self.tls = uses_tls(opts, config.net.tls)
        self.conn = connect(opts, config.net.chunk_bytes, config.net.tls)
        self.session: str | None = None
        self._stop = threading.Event()
        self._rng = stream(config.run.seed, BACKOFF_JITTER, opts.client_id)
        self.rounds_done = 0
        # The client program (train, then the update pipeline's client half); its error-feedback residuals live
        # here, across rounds.
        self.program = ClientProgram(config.fl, config.run.seed)
        self.secagg = None  # this round's SecAggClient (fl.strategy.name = "secagg")
        self._secagg_round = -1

    def _tls_hint(self, details: str | None) -> str:
        """A connection closed during the handshake is what a TLS mismatch looks like: say so."""
        text = (details or "").lower()
        if not any(sign in text for sign in ("socket closed", "ssl", "handshake", "connection reset", "eof")):
            return ""
        mine, theirs = ("on", "off") if self.tls else ("off", "on")
        return (f" — this client connects with TLS {mine}; a server with TLS {theirs} closes such connections: "
                f"make net.tls (or --tls/--no-tls) match the server's")

    def _register(self) -> None:
        cid, mine = self.opts.client_id, pipeline_fingerprint(self.config.fl)
        # what it trains, for the server to check (not with net.ship_program: it trains the program it is sent)
        said = self.trainee if self.trainee is not None and not self.config.net.ship_program else None
        try:
            reply = self.conn.register(self.opts.properties, len(self.data), said.label if said else "",
                                       said.spec.numel() if said else 0, mine)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # another model or pipeline: retrying cannot help
                raise ValueError(f"client {cid}: the server refused its registration: {err.details()}") from err
            raise
        if self.config.net.ship_program:
            try:
                self.trainee = shipped_trainee(self.conn, reply, self.config, self.data, self.device, self.trainee)
            except ValueError as err:
                raise ValueError(f"client {cid}: {err}") from err
            except grpc.RpcError as err:
                if err.code() in _TRANSIENT:  # the link dropped mid-download: the run loop retries
                    raise
                raise ValueError(f"client {cid}: the server refused the program download: {err.details()}") from err
        trainee = self._trainee()
        if reply.num_params != trainee.spec.numel() or reply.model != trainee.label:
            hint = " (or set net.ship_program = true to train the program it ships)" if reply.program_sha256 else ""
            raise ValueError(f"client {cid}: the server trains {reply.model} with {reply.num_params} parameters, "
                             f"this client's config has {trainee.label} with {trainee.spec.numel()}: use the "
                             f"server's config file{hint}")
        if reply.pipeline != mine:
            raise ValueError(f"client {cid}: the server's update pipeline {reply.pipeline} differs "
                             f"from this client's config {mine} (fl.strategy, fl.privacy, fl.compression): use the "
                             "server's config file")
        self.session = reply.session
        log.info("client %d: registered (session %s)", cid, reply.session)

    def _trainee(self) -> Trainee:
        assert self.trainee is not None, "a shipped program is loaded when the client registers"
        return self.trainee

    def _beat(self) -> None:
        while not self._stop.wait(self.config.net.heartbeat_s):
            session = self.session
            if session is None:
                continue
            try:
                reply = self.conn.heartbeat(session, self.opts.properties, timeout=self.config.net.heartbeat_s * 2)
                if not reply.known and self.session == session:
                    self.session = None  # the server restarted: the main loop registers again
            except grpc.RpcError:
                pass  # the main loop sees the same failure and reconnects

    def _evaluate_and_push(self, task: Task) -> None:
        held_out, trainee = self.eval_data, self._trainee()
        figures = evaluate(trainee.model, trainee.spec, task.params.to(self.device), held_out.x, held_out.y,
                           task=trainee.task, local=trainee.local) if len(held_out) else {}
        reply = self.conn.push_evaluation(self.session, task, len(held_out), figures.get("accuracy"),
                                          figures.get("loss", 0.0))
        log.info("client %d: round %d evaluated on %d held-out examples (%s)", self.opts.client_id, task.round,
                 len(held_out), reply.message)

    def _train_and_push(self, task: Task) -> None:
        trainee, cid = self._trainee(), self.opts.client_id
        if self.config.net.ship_program and task.program_sha256 != trainee.program_sha256:
            raise ValueError(f"round {task.round}: the plan trains program {task.program_sha256[:16]!r}, this client "
                             f"holds {trainee.program_sha256[:16]!r}: refused")
        update = self.program.train(trainee.model, trainee.spec, task.params.to(self.device), self.data, task.plan,
                                    trainee.task, trainee.local)
        if update.local_buffers is not None and trainee.local is not None:
            trainee.local = (update.local_buffers, trainee.local[1])
        loss = float(update.metrics.get("train_loss", 0.0))
        # the client program's stages, as simulated: local DP, then compression (error feedback kept here), on the
        # CPU where the wire reads the bytes
        encoded = self.program.finish(cid, update.delta.cpu(), task.round)
        if self.opts.slow_s:
            time.sleep(self.opts.slow_s)
        if self.config.fl.strategy.name == "secagg":
            if self.secagg is None or self.secagg.state.round_id != task.round:
                raise RuntimeError(f"client {cid}: a round {task.round} task without this round's key agreement")
            weight = update.num_examples if self.config.fl.strategy.weighting == "examples" else 1
            try:
                masked = self.secagg.masked_input(self.program.decode(cid, encoded), weight)
            except SecAggError as err:  # e.g. more examples than secagg.max_weight: the server drops this client
                log.error("client %d: round %d: %s", cid, task.round, err)
                return
            reply = self.conn.push_secagg(self.session, task.round, task.task_id, messages.encode(masked),
                                          num_examples=update.num_examples, train_loss=loss)
        elif encoded.codec == "none":
            reply = self.conn.push_update(self.session, task, encoded.tensors["values"], update.num_examples, loss)
        else:
            reply = self.conn.push_compressed(self.session, task, encoded.codec, encoded.tensors, update.num_examples,
                                              loss)
        log.info("client %d: round %d pushed (%s)", self.opts.client_id, task.round, reply.message)
        self.rounds_done += 1

    def _secagg_step(self, task: SecAggTask) -> None:
        """One server message of the secure-aggregation protocol in, this client's reply (if any) out."""
        from plait.federated.secagg import SecAggClient

        cid = self.opts.client_id
        if not task.payload:  # the server asks for this round's keys: a fresh client half for the round
            self.secagg = SecAggClient(cid, self.config.fl.strategy.secagg)
            self._secagg_round = task.round
        elif self.secagg is None or self._secagg_round != task.round:
            log.error("client %d: a secure-aggregation message for round %d without its keys, ignored", cid,
                      task.round)
            return
        try:
            reply = self.secagg.respond(messages.decode(task.payload) if task.payload else None)
        except (SecAggError, ValueError) as err:  # the round cannot go on for this client; the server drops it
            log.error("client %d: round %d: %s", cid, task.round, err)
            self.secagg = None
            return
        if reply is not None:
            self.conn.push_secagg(self.session, task.round, task.task_id, messages.encode(reply))

    def run(self) -> int:
        beat = threading.Thread(target=self._beat, name="plait-heartbeat", daemon=True)
        beat.start()
        failing_since, attempt = None, 0
        try:
            while True:
                try:
                    if self.session is None:
                        try:
                            self._register()
                        except ValueError as err:  # this client's config does not match the server's: final
                            log.error("%s", err)
                            return EXIT_REFUSED
                    try:
                        weights = self._trainee().weights
                        task = self.conn.get_task(self.session, self.config.net.poll_s, weights.numel(), out=weights)
                        failing_since, attempt = None, 0
                        if isinstance(task, SecAggTask):
                            self._secagg_step(task)
                        elif isinstance(task, Task) and task.plan is None:
                            self._evaluate_and_push(task)
                        elif isinstance(task, Task):
                            self._train_and_push(task)
                        elif task.kind == pb.TaskHeader.DONE:
                            log.info("client %d: training finished after round %d", self.opts.client_id,
                                     task.round)
                            return EXIT_DONE
                    except (ValueError, RuntimeError) as err:  # a bad task (e.g. non-finite weights) or training
                        # that failed: say so and serve the next rounds; the server drops this one at its deadline
                        log.error("client %d: this task failed, waiting for the next: %s", self.opts.client_id, err)
                        time.sleep(min(self.config.net.poll_s, 1.0))
                except grpc.RpcError as err:
                    code = err.code()
                    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        log.error("client %d: refused by the server: %s", self.opts.client_id, err.details())
                        return EXIT_REFUSED
                    if code == grpc.StatusCode.NOT_FOUND:
                        self.session = None  # our session is gone (server restarted): register again
                        continue
                    if code not in _TRANSIENT:  # the server refused this update; keep serving the next rounds
                        log.error("client %d: %s: %s", self.opts.client_id, code.name, err.details())
                        continue
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > self.opts.max_retry_s:
                        log.error("client %d: server unreachable for %.0f s, giving up%s", self.opts.client_id,
                                  now - failing_since, self._tls_hint(err.details()))
                        return EXIT_GAVE_UP
                    delay = min(self.opts.backoff_max_s, self.opts.backoff_s * 2 ** attempt)
                    delay *= 0.5 + self._rng.random()  # jitter: restarting servers are not hit all at once
                    attempt += 1
                    # The session is kept: a server that restarted and forgot it answers NOT_FOUND (above), and a
                    # call the server refused under load (CANCELLED) must not cost a fresh registration too.
                    log.warning("client %d: %s (%s); retrying in %.2f s%s", self.opts.client_id, code.name,
                                err.details(), delay, self._tls_hint(err.details()))
                    time.sleep(delay)
        finally:
            self._stop.set()
            beat.join(timeout=10)  # never close the channel under a heartbeat in flight
            self.conn.close()
