"""What one parameter server process is told (`ServerConfig`) and the names derived from it.

Apart from server.py so that what only needs a server's settings or file names (node.py builds the config, the
launcher finds a server's endpoint and log files, the replication handlers key state by slot) does not load the
server loop itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from plait.ps.consistency import BSP, Consistency
from plait.ps.optim import OptimizerConfig
from plait.ps.sharding import DEFAULT_PIECE_NUMEL
from plait.ps.trust import check_bind
from plait.ps.wire import HEADER_BYTES, Header

Slot = tuple[int, int]  # (key, offset): one piece of a key, the unit of state, clocks and checkpointing


def slot_of(header: Header) -> Slot:
    return header.key, header.offset


UNPIECED_MESSAGE_BYTES = 1 << 30  # the auto limit when keys are not cut into pieces (sync.piece_numel = 0)
MIN_MESSAGE_BYTES = 4096


def message_limit(setting: int, piece_numel: int) -> int:
    """`sync.max_message_bytes` resolved: 0 (auto) is twice the largest legitimate message, a piece of
    `piece_numel` float64 values and its header (8 MiB for the default pieces); -1 is no limit."""
    if setting != 0:
        return setting
    return 2 * (piece_numel * 8 + HEADER_BYTES) if piece_numel else UNPIECED_MESSAGE_BYTES


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    index: int
    endpoint: str                      # e.g. tcp://127.0.0.1:0 (a free port) or tcp://0.0.0.0:5000
    num_workers: int
    consistency: Consistency = BSP
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint_every: int = 100        # updates of the whole shard between checkpoints (0: at shutdown)
    worker_timeout_s: float = 30.0
    state_dir: str = "."               # checkpoint, endpoint file and event log live here
    resume: bool = True                # start from this server's checkpoint when one exists
    journal: bool = True               # unreplicated: journal every change before acknowledging it (journal.py)
    curve_keys: str = ""               # CurveZMQ key directory (security.py); "" serves plain TCP
    replication: int = 1               # 2: this range is held by replica 0 and replica 1 (replication.py)
    replica: int = 0                   # which of the two this process is
    partner: str = ""                  # the other replica's endpoint ("": read from its endpoint file in state_dir)
    failover_s: float = 2.0            # a replica silent this long is taken for dead
    insecure_bind: bool = False        # serve beyond loopback without CurveZMQ (trust.py); else refused
    max_message_bytes: int = message_limit(0, DEFAULT_PIECE_NUMEL)  # ZeroMQ MAXMSGSIZE on every socket (-1: none)
    refusal_log_s: float = 10.0        # refusals are logged as a count and a sample at most this often

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"server {self.index}: num_workers must be >= 1, got {self.num_workers}")
        if self.checkpoint_every < 0 or self.worker_timeout_s <= 0:
            raise ValueError("sync.checkpoint_every must be >= 0 and sync.worker_timeout_s > 0")
        if self.replication not in (1, 2) or not 0 <= self.replica < self.replication:
            raise ValueError(f"sync.replication must be 1 or 2 and the replica 0..replication-1, got "
                             f"{self.replication} and {self.replica}")
        if self.failover_s <= 0:
            raise ValueError(f"sync.failover_s must be > 0, got {self.failover_s}")
        if self.max_message_bytes != -1 and self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(f"sync.max_message_bytes must be -1 (no limit), 0 (auto) or >= {MIN_MESSAGE_BYTES}, got "
                             f"{self.max_message_bytes}")
        if self.refusal_log_s < 0:
            raise ValueError(f"refusal_log_s must be >= 0, got {self.refusal_log_s}")
        check_bind(self.endpoint, self.curve_keys, self.insecure_bind, f"server {self.index} (--bind)")

    @property
    def name(self) -> str:
        return server_name(self.index, self.replica)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.npz"

    @property
    def journal_path(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.journal"

    @property
    def endpoint_path(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.endpoint"

    @property
    def log_path(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.jsonl"

    @property
    def partner_address(self) -> str:
        """The partner replica's endpoint, or the file the local launcher's partner writes it to."""
        if self.partner:
            return self.partner
        return str(Path(self.state_dir) / f"{server_name(self.index, 1 - self.replica)}.endpoint")


def server_name(index: int, replica: int = 0) -> str:
    """server-<i> for replica 0 (every unreplicated server), server-<i>-r1 for its backup replica."""
    return f"server-{index}" if replica == 0 else f"server-{index}-r{replica}"
