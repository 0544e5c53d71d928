"""The config of a networked federated run: the simulator's sections (run, model, data, fl) plus [net].

Server and clients read the same file: the server its [net] and [fl], a client its [model], [data] and [run] (with
`net.ship_program`, a client needs no [model]: it trains the program the server sends).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from plait.data.federated import DataConfig
from plait.federated.config import FederatedRunConfig, FLConfig, ModelConfig, RunSection
from plait.federated.device import resolve_device
from plait.federated.stragglers import DeviceConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True, slots=True)
class NetSection:
    host: str = "127.0.0.1"           # address the gRPC server binds (0.0.0.0 for every interface)
    port: int = 50051                 # 0: a free port, written to the run directory's server.json
    status_port: int = 8765           # read-only HTTP status page; 0: a free port; -1: no page
    status_host: str = "127.0.0.1"    # the page stays local unless asked (it needs no credentials to read)
    tls: Literal["auto", "on", "off"] = "auto"   # auto: on unless host is a loopback address
    auth: Literal["hmac", "none"] = "hmac"       # per-client keys; "none" only on a loopback host
    client_certs: bool = False        # mutual TLS on top: clients present a certificate named client-<id>
    cert_dir: str = ""                # from `plait fl certs`: ca.pem, server.pem, server.key, server.secret
    secret_file: str = ""             # HMAC master secret (default: cert_dir/server.secret)
    chunk_bytes: int = 1 << 20        # bytes of tensor data per stream message
    heartbeat_s: float = 1.0          # how often clients beat
    heartbeat_timeout_s: float = 5.0  # a client silent this long is gone (dropped from its round)
    round_timeout_s: float = 120.0    # round deadline: stragglers still training are dropped
    wait_for_clients: int = 0         # clients to wait for before selecting a round (0: fl.min_clients)
    wait_timeout_s: float = 300.0     # once fl.min_clients are connected, wait this much longer for the rest
    poll_s: float = 10.0              # a client's task poll is held open this long
    replay_window_s: float = 300.0    # signed requests older or newer than this are refused
    linger_s: float = 5.0             # after the last round, time to tell connected clients to stop
    max_streams: int = 256            # update streams open at once, all clients together (each holds a buffer)
    max_streams_per_client: int = 2   # ... and per client (an honest client has one)
    status_connections: int = 32      # status-page connections served at once; more are closed at once
    status_timeout_s: float = 5.0     # a status-page request must arrive within this (slow readers are cut)
    # The training program travels: the server sends the model and its task as torch.export graphs (no code), and a
    # client trains them without the model's source (shipping/). Server: ship; client: take the server's program.
    ship_program: bool = False
    max_program_bytes: int = 256 << 20  # a client refuses a larger program before reading it
    client_device: Literal["auto", "cpu", "cuda"] = "auto"  # where a client trains; auto: cuda if it has a GPU

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not -1 <= self.status_port < 65536:
            raise ValueError(f"net.port / net.status_port out of range: {self.port}, {self.status_port}")
        if self.chunk_bytes < 1024 or self.chunk_bytes > 64 << 20:
            raise ValueError(f"net.chunk_bytes must be in [1 KiB, 64 MiB], got {self.chunk_bytes}")
        for name in ("heartbeat_s", "heartbeat_timeout_s", "round_timeout_s", "poll_s", "replay_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"net.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_s <= self.heartbeat_s:
            raise ValueError("net.heartbeat_timeout_s must be longer than net.heartbeat_s")
        if min(self.max_streams, self.max_streams_per_client, self.status_connections) < 1 \
                or self.status_timeout_s <= 0:
            raise ValueError("net.max_streams, net.max_streams_per_client, net.status_connections must be >= 1 and "
                             "net.status_timeout_s > 0")
        if self.max_program_bytes < 1024:
            raise ValueError(f"net.max_program_bytes must be >= 1024, got {self.max_program_bytes}")
        if self.wait_for_clients < 0 or self.wait_timeout_s < 0 or self.linger_s < 0:
            raise ValueError("net.wait_for_clients, net.wait_timeout_s and net.linger_s must be >= 0")
        loopback = self.host in LOOPBACK
        if not loopback and not self.use_tls:
            raise ValueError(f"net.tls = 'off' is refused on a non-loopback host ({self.host!r}): "
                             "updates and keys would cross the network in clear")
        if not loopback and self.auth == "none":
            raise ValueError(f"net.auth = 'none' is refused on a non-loopback host ({self.host!r})")
        if self.use_tls and not self.cert_dir:
            raise ValueError("net.cert_dir is required when TLS is on (make one with `plait fl certs DIR`)")
        if self.client_certs and not self.use_tls:
            raise ValueError("net.client_certs = true needs TLS on")
        if self.auth == "hmac" and not (self.secret_file or self.cert_dir):
            raise ValueError("net.auth = 'hmac' needs net.secret_file or net.cert_dir (with server.secret)")

    @property
    def use_tls(self) -> bool:
        return self.tls == "on" or (self.tls == "auto" and self.host not in LOOPBACK)


@dataclass(kw_only=True, slots=True)
class NetworkRunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    net: NetSection = field(default_factory=NetSection)

    def __post_init__(self) -> None:
        if self.fl.federated_eval_every and not self.data.eval_fraction:
            raise ValueError("fl.federated_eval_every needs data.eval_fraction > 0: each client evaluates on the "
                             "share of its own data it holds out")
        # Secure aggregation, local DP and compression run in the client processes, central DP on the server.
        # Attacks are an experiment of the simulator: a real deployment does not poison its own clients.
        if self.fl.attack != type(self.fl.attack)():
            raise ValueError("fl.attack simulates attackers and is not supported by the network server; remove "
                             "[fl.attack] or run the simulator (`plait run`)")
        if self.fl.baselines:
            raise ValueError("fl.baselines trains each client alone on its data, which only the simulator holds; "
                             "remove it or run the simulator (`plait run`)")
        if self.fl.devices != DeviceConfig():
            warnings.warn("fl.devices simulates device speeds and is ignored by the network server; real "
                          "stragglers are dropped at net.round_timeout_s", stacklevel=2)
        if self.fl.device == "cuda":
            warnings.warn("fl.device places the simulator's clients and is ignored by the network server (it "
                          "evaluates on the CPU); a network client trains on its net.client_device", stacklevel=2)
        if self.net.wait_for_clients and self.net.wait_for_clients < self.fl.min_clients:
            raise ValueError(f"net.wait_for_clients ({self.net.wait_for_clients}) must be >= fl.min_clients "
                             f"({self.fl.min_clients})")

    def simulation(self) -> FederatedRunConfig:
        """The same run for the in-process simulator (the reference a networked run must match)."""
        return FederatedRunConfig(run=self.run, model=self.model, data=self.data, fl=self.fl)


def client_device(setting: str) -> torch.device:
    """Where a network client trains (net.client_device): "auto" is cuda when this process sees a GPU, else the CPU;
    "cuda" without one is an error rather than a silent CPU run."""
    return resolve_device(setting, "net.client_device")
