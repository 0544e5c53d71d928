"""The root config of a federated run (`plait run CONFIG.toml`): one typed dataclass per component."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from plait.data.federated import DataConfig
from plait.federated.attacks import AttackConfig
from plait.federated.bounds import BoundsConfig
from plait.federated.pipeline import CompressionConfig
from plait.federated.plan import TrainingPlan
from plait.federated.privacy.config import PrivacyConfig
from plait.federated.server_opt import ServerOptConfig
from plait.federated.stragglers import DeviceConfig
from plait.federated.strategy import StrategyConfig
from plait.federated.topology import GossipConfig
from plait.settings.sections import ModelSection
from plait.settings.sections import RunSection as BaseRunSection
from plait.user_code import is_reference


@dataclass(kw_only=True, slots=True)
class RunSection(BaseRunSection):
    name: str = "fedavg"


@dataclass(kw_only=True, slots=True)
class ModelConfig(ModelSection):
    """`[model]`: a built-in preset by `name`, or the user's own model: `factory = "package.module:make_model"`
    (or `"file.py:make_model"`), called with `options` as keywords. `model = "pkg.mod:make_model"` is short for
    `[model] factory = ...`. The fields and their checks are every plane's (settings/sections.py)."""

    name: Literal["2nn", "cnn", "char_lstm", "word_lstm"] = "2nn"


@dataclass(kw_only=True, slots=True)
class FLConfig:
    rounds: int = 100
    fraction: float = 0.1              # C: share of registered clients selected each round
    min_clients: int = 2               # quorum: a round needs at least this many reports
    over_selection: float = 0.0        # select (1 + this) × target clients, keep the first target to report
    eligibility: dict[str, bool] = field(default_factory=dict)  # e.g. {charging = true, unmetered = true}
    eval_every: int = 1                # centralised test-set evaluation every k rounds (0: only at the end)
    target_accuracy: float = 0.0       # stop once the test accuracy reaches this (0: run every round)
    lr_decay: float = 1.0              # clients' learning rate in round r: plan.lr · lr_decay^(r-1)
    baselines: bool = False            # after the run: each client alone and one model on all the data, at its
                                       # compute, in the run's baselines.json (experiment/runs/fl_baselines.py)
    central_lr: float = 0.0            # the baseline of one model on all the data: its learning rate (0: plan.lr;
                                       # a rate that FL's local epochs hold can diverge over the central epochs)
    federated_eval_every: int = 0      # evaluation on clients' held-out data every k rounds (0: never)
    executor: Literal["sequential", "threads", "process_pool", "distributed", "auto"] = "sequential"  # how clients run
    # (distributed: over torch.distributed ranks, under torchrun; auto: measured at start, backends/auto.py)
    workers: int = 0                   # threads, process_pool: worker threads or processes (0: one per core)
    worker_threads: int = 0            # torch threads that train clients: a process_pool worker's (0: 1), the
                                       # sequential executor's while a client trains (0: run.threads, which the
                                       # main process's evaluation keeps: it uses every core while workers wait)
    # how process_pool starts its workers: fork copies this process (0.05 s; Linux, CPU, one torch thread a worker:
    # OpenMP hangs in a forked child that runs more), spawn starts fresh interpreters that import torch (1.5 s);
    # auto: fork where it is safe, else spawn (federated/pool_executor.py)
    pool_start: Literal["auto", "fork", "spawn"] = "auto"
    # where simulated clients train and the server evaluates: auto = cuda when the process sees a GPU (a torchrun rank:
    # its own, cuda:LOCAL_RANK), else the CPU; the global weights and aggregation stay on the CPU (federated/device.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    devices: DeviceConfig = field(default_factory=DeviceConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)  # topology != "none": server-less rounds
    bounds: BoundsConfig = field(default_factory=BoundsConfig)  # what an update may claim; divergence handling
    task: str = "classification"       # classification | regression | next_word | "pkg.module:MyTask"
    buffers: Literal["federated", "local"] = "federated"  # BatchNorm statistics: averaged, or kept per client

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"fl.rounds must be >= 1, got {self.rounds}")
        if self.task not in ("classification", "regression", "next_word") and not is_reference(self.task):
            raise ValueError(f"fl.task = {self.task!r}: use 'classification', 'regression', 'next_word' or a "
                             "reference to your Task class, 'package.module:MyTask'")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fl.fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"fl.min_clients must be >= 1, got {self.min_clients}")
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"fl.target_accuracy must be in [0, 1] (0: off), got {self.target_accuracy}")
        if self.central_lr < 0:
            raise ValueError(f"fl.central_lr must be >= 0 (0: fl.plan.lr), got {self.central_lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"fl.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.target_accuracy and not self.eval_every:
            raise ValueError("fl.target_accuracy needs fl.eval_every > 0 (the test accuracy it watches)")
        if self.eval_every < 0 or self.federated_eval_every < 0:
            raise ValueError("fl.eval_every and fl.federated_eval_every must be >= 0")
        unknown = set(self.eligibility) - {"charging", "idle", "unmetered"}
        if unknown:
            raise ValueError(f"fl.eligibility: unknown device properties {sorted(unknown)}; "
                             "known: charging, idle, unmetered")
        if self.gossip.enabled:
            self._check_gossip()
        if self.workers < 0 or self.worker_threads < 0:
            raise ValueError(f"fl.workers and fl.worker_threads must be >= 0, got {self.workers}, "
                             f"{self.worker_threads}")
        if self.pool_start == "fork" and self.worker_threads > 1:
            raise ValueError(f"fl.pool_start = 'fork' needs fl.worker_threads <= 1, got {self.worker_threads}: "
                             "OpenMP hangs in a forked worker that runs more threads; use 'spawn' or 'auto'")
        if self.strategy.name == "secagg" and self.compression.codec != "none":
            # masked ring elements do not compress; the codec would only ever see the unmasked delta here
            raise ValueError("fl.strategy.name = 'secagg' cannot be combined with fl.compression.codec: masked "
                             "updates look random and do not compress (compress with plain fedavg, or mask without "
                             "compression)")
        if self.privacy.mode == "central" and self.eligibility:
            raise ValueError("fl.eligibility with fl.privacy.mode = 'central': the accountant's sampling rate assumes "
                             "every client can be sampled; remove the eligibility rules")
        if self.strategy.name in ("krum", "multi_krum") and self.min_clients < 3:
            raise ValueError(f"fl.strategy.name = {self.strategy.name!r} needs fl.min_clients >= 3 (Krum scores each "
                             f"update against n - f - 2 neighbours), got {self.min_clients}")
        if self.strategy.name == "secagg" and self.min_clients < 2:
            raise ValueError(f"fl.strategy.name = 'secagg' needs fl.min_clients >= 2 (a sum of one reveals it), "
                             f"got {self.min_clients}")
        if self.privacy.mode == "central" and (self.strategy.name != "fedavg" or self.strategy.weighting != "uniform"):
            # the sensitivity bound C / expected_clients holds for a uniform sum only
            raise ValueError("fl.privacy.mode = 'central' needs fl.strategy.name = 'fedavg' and "
                             "fl.strategy.weighting = 'uniform' (its noise is sized for a uniform sum; with secure "
                             "aggregation, fl.privacy.mode = 'local' noises each update before it is masked)")

    def round_plan(self, round_idx: int) -> TrainingPlan:
        """The clients' plan in round `round_idx` (counted from 1): `plan.lr` decayed by `lr_decay^(round_idx - 1)`."""
        if self.lr_decay == 1:
            return self.plan
        return replace(self.plan, lr=self.plan.lr * self.lr_decay ** (round_idx - 1))

    def _check_gossip(self) -> None:
        """Server-less rounds have no server: the server-side choices cannot apply."""
        server_side = {"fl.strategy.name": (self.strategy.name, "fedavg"),
                       "fl.privacy.mode": (self.privacy.mode, "none"),
                       "fl.compression.codec": (self.compression.codec, "none"),
                       "fl.attack.kind": (self.attack.kind, "none"),
                       "fl.executor": (self.executor, "sequential"),
                       "fl.baselines": (self.baselines, False),
                       "fl.server_opt.name": (self.server_opt.name, "sgd")}
        for key, (value, default) in server_side.items():
            if value != default:
                raise ValueError(f"{key} = {value!r} needs a server; fl.gossip.topology = {self.gossip.topology!r} "
                                 "runs without one")


@dataclass(kw_only=True, slots=True)
class FederatedRunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fl: FLConfig = field(default_factory=FLConfig)

    def __post_init__(self) -> None:
        if self.fl.min_clients > self.data.num_clients:
            raise ValueError(f"fl.min_clients = {self.fl.min_clients} is more than data.num_clients = "
                             f"{self.data.num_clients}: no round could reach its quorum")
        if self.fl.privacy.mode != "none" and self.fl.privacy.delta >= 1 / self.data.num_clients:
            # (ε, δ) with δ ≥ 1/n allows a mechanism that publishes one client's data whole: the ε means nothing
            raise ValueError(f"fl.privacy.delta = {self.fl.privacy.delta} must be below 1 / data.num_clients = "
                             f"{1 / self.data.num_clients:.3g}; 1e-5 is usual")
        if self.fl.federated_eval_every and not self.data.eval_fraction:
            raise ValueError("fl.federated_eval_every needs data.eval_fraction > 0 (clients' held-out data)")
