"""The root config of a data-parallel run (`plait train CONFIG.toml --nproc N`, `[parallel] mode = "data"`).

Each section checks its strings once, when the config is loaded, and builds its component once, when a rank starts:
`parallel.build_allreduce(group)`, `compression.build(seed)`, `comm_hook.build(seed)`, and `train.build_optimizer`
(over whichever parameters the rank steps). The trainer hands the built objects on; nothing parses a name again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from plait.core.compress import Fp16Codec, TopKCodec
from plait.parallel.collectives import ALGORITHMS, ALLREDUCE_CLASSES, AllReduce
from plait.parallel.comm_hooks import CommHook, check_hook_name, make_comm_hook
from plait.parallel.compression import GradCompressor
from plait.parallel.divergence import check_policy
from plait.parallel.optim import check_optimizer_settings, section_optimizer
from plait.parallel.precision import check_precision
from plait.settings.sections import ImageModelSection as ModelSection
from plait.settings.sections import TaskName, UserDataSection


@dataclass(kw_only=True, slots=True)
class RunSection:
    name: str = "data_parallel"
    root: str = "runs"
    seed: int = 0
    tensorboard: bool = True           # also write TensorBoard event files to the run's tb/

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")


@dataclass(kw_only=True, slots=True)
class ParallelSection:
    mode: Literal["data"] = "data"
    allreduce: str = "native"          # native | ring | tree | naive
    bucket_mb: float = 1.0             # gradient bucket size (MiB); smaller buckets start sync earlier
    overlap: bool = True               # start each bucket's sync from backward's hooks (False: after backward)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    threads_per_rank: int = 1          # torch threads in each spawned rank

    def __post_init__(self) -> None:
        if self.allreduce not in ALLREDUCE_CLASSES:
            raise ValueError(f"parallel.allreduce = {self.allreduce!r} is unknown; choose one of {list(ALGORITHMS)}")
        if not self.bucket_mb > 0:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.threads_per_rank < 0:
            raise ValueError(
                f"parallel.threads_per_rank must be >= 0 (0: torch's default), got {self.threads_per_rank}")

    def build_allreduce(self, group: dist.ProcessGroup | None) -> AllReduce:
        """The gradient sync's all-reduce algorithm over `group`."""
        return ALLREDUCE_CLASSES[self.allreduce](group)


@dataclass(kw_only=True, slots=True)
class SyncSection:
    kind: Literal["allreduce", "local_sgd", "ps_one_device", "sharded"] = "allreduce"  # sharded: FSDP2
    local_steps: int = 8               # local_sgd: average the parameters every H steps
    shard_optimizer: bool = False      # allreduce: ZeRO-1, each rank keeps and steps 1/n of the optimizer state
    shard_gradients: bool = False      # with shard_optimizer: ZeRO-2, gradients reduce-scattered, 1/n kept per rank

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"sync.local_steps must be >= 1, got {self.local_steps}")
        if self.shard_optimizer and self.kind != "allreduce":
            raise ValueError(f"sync.shard_optimizer needs sync.kind = 'allreduce' (\"sharded\" shards the optimizer "
                             f"state already), got {self.kind!r}")
        if self.shard_gradients and not self.shard_optimizer:
            raise ValueError("sync.shard_gradients = true (ZeRO-2) needs sync.shard_optimizer = true (the gradient "
                             "slices are those the optimizer shards step)")


@dataclass(kw_only=True, slots=True)
class DataSection(UserDataSection):
    """`[data]`: a built-in image set by `name`, or the user's own by `source` (settings/sections.py)."""
    name: Literal["mnist", "fashion_mnist"] = "mnist"
    path: str = ""                     # a directory with IDX files (default: the packaged copy)
    cache_dir: str = ""


@dataclass(kw_only=True, slots=True)
class TrainSection:
    steps: int = 200
    batch_size: int = 32               # per rank and per micro-batch
    accumulate: int = 1                # micro-batches per step; gradients sync once, after the last
    optimizer: str = "sgd"             # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.0              # sgd
    weight_decay: float = 0.0
    beta1: float = 0.9                 # adam, adamw
    beta2: float = 0.999
    eps: float = 1e-8
    log_every: int = 1                 # metrics record every k steps (each costs one small all-gather)
    checkpoint_every: int = 50         # 0: only at the end
    eval_at_end: bool = True           # test accuracy on rank 0 after the last step
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler, CUDA only)
    on_divergence: str = "stop"        # a non-finite loss, gradient or update: stop (exit 1) | skip the update
    task: TaskName = "classification"      # the loss: cross-entropy on class labels | regression: MSE on float targets

    def __post_init__(self) -> None:
        check_precision(self.precision, "train")
        check_policy(self.on_divergence, "train")
        for key in ("steps", "batch_size", "accumulate", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train.momentum must be in [0, 1), got {self.momentum}")
        check_optimizer_settings(self, "train")

    def build_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over the parameters a rank steps (its replica, or its ZeRO slice)."""
        return section_optimizer(self, params)


@dataclass(kw_only=True, slots=True)
class CompressionSection:
    codec: Literal["none", "fp16", "topk"] = "none"
    ratio: float = 0.01                # topk: share of gradient entries sent
    error_feedback: bool = True        # add back what earlier steps dropped (topk needs it to converge)

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"compression.ratio must be in (0, 1], got {self.ratio}")

    def build(self, seed: int) -> GradCompressor | None:
        """A rank's gradient compressor (None: gradients travel uncompressed)."""
        if self.codec == "none":
            return None
        codec = TopKCodec(ratio=self.ratio, seed=seed) if self.codec == "topk" else Fp16Codec(seed=seed)
        return GradCompressor(codec, error_feedback=self.error_feedback)


@dataclass(kw_only=True, slots=True)
class CommHookSection:
    name: str = "none"                 # none | allreduce | fp16 | bf16 | powersgd | topk | "package.module:attribute"
    rank: int = 4                      # powersgd: rank of the low-rank factors
    start_step: int = 10               # powersgd: plain all-reduce for each bucket's first steps
    ratio: float = 0.01                # topk: share of gradient entries sent
    error_feedback: bool = True        # powersgd, topk: add back what earlier steps left out

    def __post_init__(self) -> None:
        check_hook_name(self.name)
        if self.rank < 1:
            raise ValueError(f"comm_hook.rank must be >= 1, got {self.rank}")
        if self.start_step < 0:
            raise ValueError(f"comm_hook.start_step must be >= 0, got {self.start_step}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"comm_hook.ratio must be in (0, 1], got {self.ratio}")

    def build(self, seed: int) -> CommHook | None:
        """A rank's communication hook (None: the trainer's own sync); `seed` draws PowerSGD's first Q."""
        return make_comm_hook(self.name, rank=self.rank, start_step=self.start_step, ratio=self.ratio,
                              error_feedback=self.error_feedback, seed=seed)


@dataclass(kw_only=True, slots=True)
class StragglerSection:
    ranks: list[int] = field(default_factory=list)   # ranks to slow down
    factor: float = 1.0                # a slowed step takes factor × its compute time (sleeping the difference)
    probability: float = 1.0           # share of steps slowed (seeded per rank and step); 1: every step

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"stragglers.factor must be >= 1, got {self.factor}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"stragglers.probability must be in [0, 1], got {self.probability}")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"stragglers.ranks must be rank numbers >= 0, got {self.ranks}")


@dataclass(kw_only=True, slots=True)
class DataParallelRunConfig:
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    sync: SyncSection = field(default_factory=SyncSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    comm_hook: CommHookSection = field(default_factory=CommHookSection)
    stragglers: StragglerSection = field(default_factory=StragglerSection)

    def __post_init__(self) -> None:
        if self.compression.codec != "none" and self.sync.kind != "allreduce":
            raise ValueError(f"compression.codec = {self.compression.codec!r} needs sync.kind = 'allreduce', "
                             f"got {self.sync.kind!r}")
        if self.comm_hook.name != "none":
            if self.sync.kind != "allreduce":
                raise ValueError(f"comm_hook.name = {self.comm_hook.name!r} needs sync.kind = 'allreduce', "
                                 f"got {self.sync.kind!r}")
            if self.compression.codec != "none":
                raise ValueError(f"comm_hook.name = {self.comm_hook.name!r} and compression.codec = "
                                 f"{self.compression.codec!r} both compress the gradients: choose one")
        if self.sync.shard_gradients and (self.compression.codec != "none" or self.comm_hook.name != "none"):
            raise ValueError("sync.shard_gradients = true reduce-scatters plain gradients: it does not go with "
                             f"compression.codec = {self.compression.codec!r} or comm_hook.name = "
                             f"{self.comm_hook.name!r}")
        if self.train.precision == "fp16" and self.sync.shard_optimizer:
            raise ValueError("train.precision = 'fp16' does not go with sync.shard_optimizer (each rank would check "
                             "only its slice for overflows); use 'bf16'")
        if self.train.precision == "fp16" and self.sync.kind in ("ps_one_device", "sharded"):
            raise ValueError(f"train.precision = 'fp16' does not go with sync.kind = {self.sync.kind!r} (the grad "
                             "scaler's overflow check would not be shared by every rank); use 'bf16'")
        if self.sync.kind == "local_sgd" and self.train.on_divergence == "skip":
            raise ValueError("train.on_divergence = 'skip' does not go with sync.kind = 'local_sgd' (its ranks do not "
                             "meet every step to agree on a skip); use 'stop'")
        if self.sync.kind == "local_sgd" and self.train.checkpoint_every % self.sync.local_steps:
            raise ValueError(f"train.checkpoint_every = {self.train.checkpoint_every} must be a multiple of "
                             f"sync.local_steps = {self.sync.local_steps} (checkpoints hold averaged parameters)")

    def check_world(self, world_size: int) -> None:
        bad = [r for r in self.stragglers.ranks if r >= world_size]
        if bad:
            raise ValueError(f"stragglers.ranks {bad} do not exist in a world of {world_size} ranks")
