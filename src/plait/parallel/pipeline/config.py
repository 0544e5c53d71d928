"""The root config of a model- or pipeline-parallel run (`plait train CONFIG.toml --nproc N`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from plait.parallel.divergence import check_policy
from plait.parallel.optim import check_optimizer_settings, section_optimizer
from plait.parallel.pipeline.model import build_sequential
from plait.parallel.pipeline.schedule import build_schedule
from plait.parallel.precision import check_precision
from plait.settings.sections import ModelSection as BaseModelSection
from plait.settings.sections import RunSection as BaseRunSection
from plait.settings.sections import TaskName, UserDataSection


@dataclass(kw_only=True, slots=True)
class RunSection(BaseRunSection):
    name: str = "pipeline"
    threads: int = 1            # torch threads per rank (each rank is one stage)


@dataclass(kw_only=True, slots=True)
class ModelSection(BaseModelSection):
    """`[model]`: a preset by `name`, or the user's own `factory` returning an nn.Sequential (or an nn.ModuleList
    of blocks) that the pipeline cuts into stages (settings/sections.py)."""
    name: Literal["mlp", "2nn", "cnn"] = "mlp"
    depth: int = 8              # mlp: number of Linear layers
    hidden: int = 256           # mlp and 2nn: hidden width

    def __post_init__(self) -> None:
        BaseModelSection.__post_init__(self)  # (no zero-argument super() in a slotted dataclass)
        if self.depth < 2:
            raise ValueError(f"model.depth must be >= 2, got {self.depth}")
        if self.hidden < 1:
            raise ValueError(f"model.hidden must be >= 1, got {self.hidden}")


@dataclass(kw_only=True, slots=True)
class DataSection(UserDataSection):
    """`[data]`: a built-in image set by `name`, or the user's own by `source` (settings/sections.py)."""
    name: Literal["mnist", "fashion_mnist"] = "mnist"
    path: str | None = None     # a directory of IDX files instead of the packaged copy
    batch_size: int = 64        # global batch: split across replicas, then into micro-batches

    def __post_init__(self) -> None:
        UserDataSection.__post_init__(self)
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True, slots=True)
class TrainSection:
    steps: int = 300
    optimizer: str = "sgd"      # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9       # sgd
    weight_decay: float = 0.0
    beta1: float = 0.9          # adam, adamw
    beta2: float = 0.999
    eps: float = 1e-8
    log_every: int = 10         # loss and bubble into metrics.jsonl every k steps
    eval_every: int = 100       # test accuracy by pipelined inference every k steps (0: only at the end)
    eval_examples: int = 10000  # test examples used for evaluation
    checkpoint_every: int = 100  # 0: only at the end
    precision: str = "fp32"     # fp32 | bf16 (autocast in every stage; fp16 would need one scaler across stages)
    on_divergence: str = "stop"  # a non-finite loss, gradient or update: stop (exit 1) | skip the update
    task: TaskName = "classification"  # the loss: cross-entropy on class labels | regression: MSE on float targets

    def __post_init__(self) -> None:
        check_precision(self.precision, "train")
        check_policy(self.on_divergence, "train")
        if self.precision == "fp16":
            raise ValueError("train.precision = 'fp16' is not supported by the pipeline (its grad scaler would have "
                             "to agree across stages); use 'bf16'")
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train.momentum must be in [0, 1), got {self.momentum}")
        for name in ("log_every", "eval_every", "checkpoint_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every == 0:
            raise ValueError("train.log_every must be >= 1")
        if self.eval_examples < 1:
            raise ValueError(f"train.eval_examples must be >= 1, got {self.eval_examples}")
        check_optimizer_settings(self, "train")

    def build_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over one stage's parameters."""
        return section_optimizer(self, params)


@dataclass(kw_only=True, slots=True)
class ParallelSection:
    mode: Literal["model", "pipeline"] = "pipeline"
    stages: int = 2
    micro_batches: int | None = None   # default: 1 for model parallelism, 4 for a pipeline
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    chunks_per_rank: int | None = None  # interleaved_1f1b: model chunks per rank, v (default 2); 1 otherwise
    replicas: int = 1                  # data × pipeline: r copies of the pipeline, r × stages ranks
    partition: Literal["params", "time", "explicit"] = "params"
    boundaries: list[int] = field(default_factory=list)  # explicit: first layer of (virtual) stages 1..p·v-1
    recompute: bool = False            # keep only stage inputs; redo each forward during its backward
    build: Literal["full", "meta"] = "full"  # meta: build on the meta device, materialise only this rank's stage

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"parallel.stages must be >= 1, got {self.stages}")
        if self.replicas < 1:
            raise ValueError(f"parallel.replicas must be >= 1, got {self.replicas}")
        if self.micro_batches is None:
            self.micro_batches = 1 if self.mode == "model" else 4
        if self.micro_batches < 1:
            raise ValueError(f"parallel.micro_batches must be >= 1, got {self.micro_batches}")
        if self.mode == "model" and self.micro_batches != 1:
            raise ValueError(f"parallel.mode = 'model' runs one micro-batch; parallel.micro_batches = "
                             f"{self.micro_batches} asks for a pipeline (mode = 'pipeline')")
        if self.chunks_per_rank is None:
            self.chunks_per_rank = 2 if self.schedule == "interleaved_1f1b" else 1
        build_schedule(self.schedule, self.stages, self.micro_batches, self.chunks_per_rank)  # its errors name keys
        pieces = self.stages * self.chunks_per_rank
        if self.partition == "explicit" and len(self.boundaries) != pieces - 1:
            chunks = f" × {self.chunks_per_rank} chunks" if self.chunks_per_rank > 1 else ""
            raise ValueError(f"parallel.partition = 'explicit' needs parallel.boundaries with {pieces - 1} "
                             f"entries ({self.stages} stages{chunks}), got {self.boundaries}")
        if self.partition != "explicit" and self.boundaries:
            raise ValueError("parallel.boundaries is only used with parallel.partition = 'explicit'")
        if self.build == "meta" and self.partition == "time":
            raise ValueError("parallel.build = 'meta' cannot be combined with parallel.partition = 'time': profiling "
                             "runs every layer on real tensors, which a meta-built model does not have; use "
                             "partition = 'params' or 'explicit', or build = 'full'")


@dataclass(kw_only=True, slots=True)
class PipelineRunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self) -> None:
        per_replica, rest = divmod(self.data.batch_size, self.parallel.replicas)
        if rest:
            raise ValueError(f"data.batch_size = {self.data.batch_size} must be divisible by parallel.replicas = "
                             f"{self.parallel.replicas}")
        if per_replica < self.parallel.micro_batches:
            raise ValueError(f"each replica's batch ({per_replica}) is smaller than parallel.micro_batches = "
                             f"{self.parallel.micro_batches}")
        par, model = self.parallel, self.model
        if model.factory:
            return  # the user's model is counted when it is built, at start (pipeline_train.check_config_code)
        layers, chunks = layer_count(model.name, model.depth, model.hidden), par.chunks_per_rank or 1
        if layers < par.stages * chunks:
            what = (f"parallel.stages × parallel.chunks_per_rank = {par.stages} × {chunks} = "
                    f"{par.stages * chunks}" if chunks > 1 else
                    f"parallel.stages = {par.stages}")
            name = f"model.depth = {model.depth}" if model.name == "mlp" else f"model.name = {model.name!r}"
            raise ValueError(f"{name} gives {layers} layers, fewer than "
                             f"{what}: every (virtual) stage needs at least one layer")


def layer_count(name: str, depth: int, hidden: int) -> int:
    """How many layers the pipeline can cut the model into. The MLP (the one whose size is configured) is counted,
    not built: Flatten, then `depth` Linear layers with a ReLU between two. The others are small and fixed: built
    without drawing from the global generator that seeds the real weights."""
    if name == "mlp":
        return 2 * depth
    with torch.random.fork_rng(devices=[]):
        return len(build_sequential(name, depth, hidden))
