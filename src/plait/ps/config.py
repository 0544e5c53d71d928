"""The root config of a parameter-server run (`plait train CONFIG.toml --nproc N` with `[sync] kind = "ps"`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.ps.consistency import BSP, Consistency
from plait.ps.optim import OptimizerConfig
from plait.ps.server_config import MIN_MESSAGE_BYTES, message_limit
from plait.ps.sharding import DEFAULT_PIECE_NUMEL
from plait.ps.trust import check_bind
from plait.settings.sections import ImageModelSection as ModelSection
from plait.settings.sections import RunSection as BaseRunSection
from plait.settings.sections import TaskName, UserDataSection


@dataclass(kw_only=True, slots=True)
class RunSection(BaseRunSection):
    name: str = "ps"
    threads: int = 1            # torch threads per worker (the small models run best on one)


@dataclass(kw_only=True, slots=True)
class DataSection(UserDataSection):
    """`[data]`: a built-in image set by `name`, or the user's own by `source` (settings/sections.py)."""
    name: Literal["mnist", "fashion_mnist"] = "mnist"
    path: str | None = None          # a directory of IDX files instead of the packaged set
    test_examples: int = 2000        # the evaluator's fixed test subset (0: the whole test set)

    def __post_init__(self) -> None:
        UserDataSection.__post_init__(self)
        if self.test_examples < 0:
            raise ValueError(f"data.test_examples must be >= 0, got {self.test_examples}")


@dataclass(kw_only=True, slots=True)
class TrainSection:
    steps: int = 300                 # clocks per worker
    batch_size: int = 32             # per worker and step; workers read disjoint slices of the training set
    eval_every_s: float = 1.0        # the launcher's evaluator pulls and scores the model this often
    target_loss: float = 0.0         # report when the test loss first reaches this (0: don't)
    on_divergence: Literal["stop", "skip"] = "stop"  # a worker's non-finite loss or gradient: stop the run (exit 1,
                                                      # the servers' last good checkpoints kept) or skip that step
    task: TaskName = "classification"    # the loss: cross-entropy on class labels | regression: MSE on float targets

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train.steps and train.batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.eval_every_s <= 0 or self.target_loss < 0:
            raise ValueError("train.eval_every_s must be > 0 and train.target_loss >= 0")


@dataclass(kw_only=True, slots=True)
class SyncSection:
    kind: Literal["ps"] = "ps"
    servers: int = 1
    consistency: Consistency = BSP   # "bsp", "ssp:S" (e.g. "ssp:3") or "asp" in the file, built once when read
    host: str = "127.0.0.1"          # where the servers bind (under torchrun 0.0.0.0 is dialled at the host's name)
    checkpoint_every: int = 200      # updates of a server's whole shard between its checkpoints (0: only at the end)
    journal: bool = True             # unreplicated servers journal each change before acknowledging it, so a killed
                                     # one loses nothing; false: it loses what came after its last checkpoint
    worker_timeout_s: float = 10.0   # a silent worker leaves the clocks after this long
    retry_s: float = 1.0             # a worker resends an unanswered request after this long
    wait_timeout_s: float = 300.0    # a worker gives up on an answer after this long
    max_server_restarts: int = 3     # per server, by the local launcher (under torchrun, by the server's rank)
    max_worker_restarts: int = 3     # per worker, likewise (it resumes at the clock the servers hold)
    piece_numel: int = DEFAULT_PIECE_NUMEL  # elements per message at most: a server updates one while the next
                                            # arrives (0: one piece per server and key)
    curve_keys: str = ""             # a CurveZMQ key directory: encrypted, authenticated traffic ("" : plain TCP)
    replication: int = 1             # 2: each server's range is held by two processes, a primary and its backup
    failover_s: float = 2.0          # replication: a replica silent this long is taken for dead
    status_port: int = -1            # the launcher's live dashboard (HTTP, read-only): 0 a free port, -1 none
    status_host: str = "127.0.0.1"   # where the dashboard binds: it has no authentication, keep it local
    insecure_bind: bool = False      # let servers listen beyond loopback without curve_keys (refused otherwise)
    max_message_bytes: int = 0       # ZeroMQ MAXMSGSIZE on every server socket; 0: twice a piece of piece_numel
                                     # float64 values (8 MiB by default; 1 GiB with piece_numel = 0); -1: no limit

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ValueError(f"sync.servers must be >= 1, got {self.servers}")
        if self.replication not in (1, 2):
            raise ValueError(f"sync.replication must be 1 (no replica) or 2 (primary and backup), got "
                             f"{self.replication}")
        if self.failover_s <= 0:
            raise ValueError(f"sync.failover_s must be > 0, got {self.failover_s}")
        if min(self.checkpoint_every, self.max_server_restarts, self.max_worker_restarts, self.piece_numel) < 0:
            raise ValueError("sync.checkpoint_every, sync.max_server_restarts, sync.max_worker_restarts and "
                             "sync.piece_numel must be >= 0")
        if min(self.worker_timeout_s, self.retry_s, self.wait_timeout_s) <= 0:
            raise ValueError("sync.worker_timeout_s, sync.retry_s and sync.wait_timeout_s must be > 0")
        if not -1 <= self.status_port < 65536:
            raise ValueError(f"sync.status_port must be a port (0: a free one) or -1 (no dashboard), got "
                             f"{self.status_port}")
        limit = self.message_limit()
        if limit != -1 and limit < max(MIN_MESSAGE_BYTES, self.piece_numel * 4):
            raise ValueError(f"sync.max_message_bytes must be -1 (no limit), 0 (auto) or at least {MIN_MESSAGE_BYTES} "
                             f"and a piece of sync.piece_numel float32 values ({self.piece_numel * 4} bytes), got "
                             f"{self.max_message_bytes}")
        check_bind(f"tcp://{self.host}:0", self.curve_keys, self.insecure_bind, "sync.host")

    def message_limit(self) -> int:
        """sync.max_message_bytes in bytes (-1: no limit)."""
        return message_limit(self.max_message_bytes, self.piece_numel)


@dataclass(kw_only=True, slots=True)
class StragglerSection:
    """Slow a worker by `factor`: after computing a step it sleeps until the step took factor x its compute time.

    `step_s` emulates a cluster of separate machines on one shared host: every worker's step is padded to at least
    `step_s` of compute (a slowed one to factor x that), so the straggling is a fixed time instead of a multiple of
    compute times that the workers' contention for the host's cores stretches differently under each consistency.
    """
    worker: int = -1                 # the slowed worker (-1: none)
    factor: float = 1.0
    mode: Literal["fixed", "rotating"] = "fixed"   # rotating: at clock c, worker c mod N is the slow one
    step_s: float = 0.0              # > 0: pad every worker's compute to at least this many seconds

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"straggler.factor must be >= 1, got {self.factor}")
        if self.step_s < 0:
            raise ValueError(f"straggler.step_s must be >= 0, got {self.step_s}")

    def step_time(self, compute_s: float, rank: int, step: int, num_workers: int) -> float:
        """How long this worker's step should take, compute included (sleep the rest)."""
        base = max(compute_s, self.step_s)
        slowed = self.factor > 1 and (step % num_workers == rank if self.mode == "rotating" else rank == self.worker)
        return base * self.factor if slowed else base


@dataclass(kw_only=True, slots=True)
class FaultSection:
    """Failure injection, to see fault tolerance work: SIGKILL a server, end a worker abruptly, stall one, or make
    one's step diverge."""
    kill_server: int = -1            # the launcher kills this server once the slowest worker reached kill_at_step
    kill_at_step: int = 0
    kill_replica: int = 0            # sync.replication = 2: which replica of kill_server (0 or 1)
    kill_every: int = 0              # > 0: then kill the next server process every kill_every steps, each once
                                     # (in the order server 0..S-1 replica 0, then replica 1), after the last one
                                     # killed is back (and, replicated, caught up)
    kill_worker: int = -1            # this worker exits abruptly (no goodbye) at kill_worker_at_step
    kill_worker_at_step: int = 0
    stall_worker: int = -1           # this worker pauses for stall_s seconds (alive, silent) at stall_at_step
    stall_at_step: int = 0
    stall_s: float = 0.0
    nan_worker: int = -1             # this worker's loss and gradient turn NaN at nan_at_step (a diverged step)
    nan_at_step: int = 0

    def kill_plan(self, servers: int, processes: int) -> list[tuple[int, int]]:
        """(step, process) of each server kill asked for, in order (process p is server p mod S, replica p // S)."""
        if self.kill_server < 0:
            return []
        first = self.kill_replica * servers + self.kill_server
        count = processes if self.kill_every else 1
        return [(self.kill_at_step + n * self.kill_every, (first + n) % processes) for n in range(count)]

    def __post_init__(self) -> None:
        if self.stall_s < 0:
            raise ValueError(f"fault.stall_s must be >= 0, got {self.stall_s}")
        if self.kill_every < 0 or self.kill_replica not in (0, 1):
            raise ValueError(f"fault.kill_every must be >= 0 and fault.kill_replica 0 or 1, got {self.kill_every} "
                             f"and {self.kill_replica}")


@dataclass(kw_only=True, slots=True)
class PSRunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sync: SyncSection = field(default_factory=SyncSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    straggler: StragglerSection = field(default_factory=StragglerSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def check_workers(self, num_workers: int) -> None:
        """The settings that depend on the number of workers, checked once it is known."""
        if num_workers < 1:
            raise ValueError(f"--nproc (workers) must be >= 1, got {num_workers}")
        for name, value in (("straggler.worker", self.straggler.worker), ("fault.kill_worker", self.fault.kill_worker),
                            ("fault.stall_worker", self.fault.stall_worker),
                            ("fault.nan_worker", self.fault.nan_worker)):
            if value >= num_workers:
                raise ValueError(f"{name} = {value} but there are only {num_workers} workers")
        if self.fault.kill_server >= self.sync.servers:
            raise ValueError(f"fault.kill_server = {self.fault.kill_server} but sync.servers = {self.sync.servers}")
        if self.fault.kill_replica >= self.sync.replication:
            raise ValueError(f"fault.kill_replica = {self.fault.kill_replica} but sync.replication = "
                             f"{self.sync.replication}")
