"""`DataParallel`: one replica per rank, one training step at a time, under one of three sync policies.

- "allreduce" (BSP, every step): gradients are bucketed and all-reduced from backward's hooks (`GradSync`); the
  optimizer step waits for every bucket. Optionally compressed (fp16, top-k with error feedback). ZeRO-1
  (`shard_optimizer`) shards the optimizer state, ZeRO-2 (`shard_gradients` too) the gradients as well.
- "local_sgd": no gradient sync; every `local_steps` steps the parameters are averaged (one all-reduce of the
  flat parameter buffer). Each rank keeps its own optimizer state between averages.
- "ps_one_device": the parameter server on one device of the lecture's multi-GPU slide: gradients are reduced onto
  rank 0 (`dist.reduce`, bucketed and overlapped like the all-reduce), rank 0 alone holds the optimizer and steps,
  then broadcasts the weights (`dist.broadcast`).

With "allreduce", a communication hook (comm_hooks.py: fp16/bf16, PowerSGD, shared top-k, or the user's own) may
sync each bucket instead of the plain mean. `precision` ("fp32" | "bf16" | "fp16") runs forward and loss under
autocast (fp16 with a grad scaler). Every tensor a step creates lives on the model's device; the step makes no host
sync (its loss comes back as a device tensor).

Parameters are views into one flat buffer (`flat_param`), so averaging, broadcasting and checkpointing move one
tensor. The optimizer is SGD (momentum, weight decay), Adam or AdamW (optim.py): its state travels as one flat tensor
per kind (momentum, Adam's two moments), checkpointed and broadcast as such.

A user's own module in a user's own loop gets the same gradient sync from `wrap` (wrap.py), which drives the same
`GradSync` from the module's forward and the end of backward instead of from `train_step`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.collectives import AllReduce, CommStats, make_allreduce
from plait.parallel.comm_hooks import CommHook
from plait.parallel.compression import GradCompressor
from plait.parallel.dims import ParallelDims
from plait.parallel.divergence import DivergenceGuard
from plait.parallel.grad_shard_sync import GradShardSync
from plait.parallel.grad_sync import GradSync
from plait.parallel.optim import OptimizerFactory, flat_state, load_flat_state, optimizer_factory, optimizer_name
from plait.parallel.precision import MixedPrecision
from plait.parallel.zero import OptimizerShard

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PLAIN_SGD = optimizer_factory("sgd", lr=0.05)  # the trainers' default (train.optimizer, train.lr)


@dataclass(slots=True)
class StepTimes:
    compute_s: float   # forward + backward (+ injected straggler delay)
    comm_s: float      # time blocked on communication after backward (what overlap did not hide)
    total_s: float


def _flatten_params_into_buffer(model: nn.Module) -> tuple[torch.Tensor, list[nn.Parameter]]:
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)  # the module now reads and writes the flat buffer
        offset += p.numel()
    return flat, params


class DataParallel:
    """`allreduce` is the algorithm over `dims.grad_group` (default: the backend's native one), `optimizer` builds the
    optimizer over the parameters this rank steps (`optim.optimizer_factory`, or a config section's
    `build_optimizer`); both come built, as do `compressor` and `comm_hook`. DataParallel closes the all-reduce."""

    def __init__(self, model: nn.Module, dims: ParallelDims, *, kind: str = "allreduce",
                 allreduce: AllReduce | None = None, local_steps: int = 1, bucket_bytes: int = 1 << 20,
                 overlap: bool = True, optimizer: OptimizerFactory = PLAIN_SGD,
                 compressor: GradCompressor | None = None, comm_hook: CommHook | None = None,
                 precision: str = "fp32", shard_optimizer: bool = False, shard_gradients: bool = False,
                 loss_fn: LossFn = nn.functional.cross_entropy):
        if kind not in ("allreduce", "local_sgd", "ps_one_device"):
            raise ValueError(f"sync.kind = {kind!r} is not a data-parallel policy")
        if comm_hook is not None and kind != "allreduce":
            raise ValueError(f"a communication hook needs sync.kind = 'allreduce', got {kind!r}")
        if comm_hook is not None and compressor is not None:
            raise ValueError("compression.codec and comm_hook.name both compress the gradients: choose one")
        if shard_optimizer and kind != "allreduce":
            raise ValueError(f"sync.shard_optimizer needs sync.kind = 'allreduce', got {kind!r}")
        if shard_gradients and not shard_optimizer:
            raise ValueError("sync.shard_gradients (ZeRO-2) needs sync.shard_optimizer = true")
        if shard_gradients and (compressor is not None or comm_hook is not None):
            raise ValueError("sync.shard_gradients reduce-scatters plain gradients: it does not go with "
                             "compression.codec or comm_hook.name")
        if shard_optimizer and precision == "fp16":
            # each rank would check only its slice for overflows: the ranks could disagree on skipping a step
            raise ValueError("train.precision = 'fp16' does not go with sync.shard_optimizer; use 'bf16'")
        if precision == "fp16" and kind == "ps_one_device":
            # only rank 0 steps, so only its grad scaler would learn of overflows; the others' scales would drift
            raise ValueError("train.precision = 'fp16' does not go with sync.kind = 'ps_one_device'; use 'bf16'")
        self.model, self.kind, self.local_steps, self.loss_fn = model, kind, local_steps, loss_fn
        self.group = dims.grad_group
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self.flat_param, self.params = _flatten_params_into_buffer(model)
        self.device = self.flat_param.device  # every tensor a step makes goes here
        self.precision = MixedPrecision(precision, self.device)
        self.allreduce = allreduce if allreduce is not None else make_allreduce("native", self.group)
        allreduce_op = "hook" if comm_hook is not None else "compressed" if compressor else "allreduce"
        op = {"allreduce": allreduce_op, "local_sgd": "allreduce", "ps_one_device": "reduce"}[kind]
        # ZeRO-1: each rank steps 1/n of the flat parameters with 1/n of the state, then all-gathers (zero.py);
        # ZeRO-2: the gradients are reduce-scattered into those slices, no rank keeps them whole (grad_shard_sync.py).
        # ps_one_device: only the server (rank 0) owns an optimizer; the others just compute gradients.
        self.zero = (OptimizerShard(self.flat_param, self.params, self.group, optimizer, grads_sharded=shard_gradients)
                     if shard_optimizer else None)
        self.grad_sync: GradSync | GradShardSync
        if self.zero is not None and shard_gradients:
            self.grad_sync = GradShardSync(self.params, self.zero, bucket_bytes=bucket_bytes, overlap=overlap)
        else:
            self.grad_sync = GradSync(self.params, self.allreduce, bucket_bytes=bucket_bytes, op=op, overlap=overlap,
                                      compressor=compressor, comm_hook=comm_hook)
        self.optimizer = (self.zero.optimizer if self.zero is not None
                          else optimizer(self.params) if kind != "ps_one_device" or self.rank == 0 else None)
        self.optimizer_name = optimizer_name(self.optimizer) if self.optimizer is not None else None
        self.broadcast_stats = CommStats()

    # ---- replicas start equal -------------------------------------------------------------------------------------
    def broadcast_params(self) -> None:
        """Make every replica start from rank 0's parameters (as DDP does at construction)."""
        if self.world_size > 1:
            dist.broadcast(self.flat_param, src=self._root, group=self.group)

    # ---- one step -------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int,
                   delay_s: float = 0.0, guard: DivergenceGuard | None = None) -> tuple[torch.Tensor, StepTimes]:
        """Forward/backward every micro-batch, sync, update. `step` is 1-based (local SGD averages when
        step % local_steps == 0). Returns this rank's mean loss (a tensor: no host sync) and the step's times.
        With a `guard`, the update is applied only if no rank's loss, synced gradient or parameters are non-finite
        (divergence.py: it stops the run, or skips the update)."""
        start = time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)  # injected straggler: this rank's step is slower, its sync starts later
        self.grad_sync.reset()
        syncs_grads = self.kind != "local_sgd"
        total = torch.zeros((), device=self.device)  # on the loss's device: a CPU scalar cannot take a CUDA loss
        last = len(micro_batches) - 1
        for i, (x, y) in enumerate(micro_batches):
            # accumulation: only the last micro-batch's backward starts the gradient sync
            quiet = i < last or not syncs_grads
            with self.grad_sync.no_sync() if quiet else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(x), y) / len(micro_batches)
                self.precision.scale(loss).backward()
            total += loss.detach().float()
        computed = time.perf_counter()
        if syncs_grads:
            self.grad_sync.finish()
        synced = time.perf_counter()
        if guard is None or self._check(guard, step, total):
            if self.zero is not None:
                self.zero.step(self.precision.step)
            elif self.optimizer is not None:
                self.precision.step(self.optimizer)
        stepped = time.perf_counter()
        if self.kind == "ps_one_device":
            self._broadcast_from_root()
        elif self.kind == "local_sgd" and step % self.local_steps == 0:
            if guard is not None:
                guard.agree(step, [self.flat_param])  # before averaging: a diverged replica never spreads
            self.average_params()
        end = time.perf_counter()
        times = StepTimes(compute_s=computed - start, comm_s=(synced - computed) + (end - stepped),
                          total_s=end - start)
        return total, times

    def _check(self, guard: DivergenceGuard, step: int, loss: torch.Tensor) -> bool:
        """Whether to apply this step's update (divergence.py)."""
        # fp16's scaled gradients overflow by design: its grad scaler skips those steps itself
        if isinstance(self.grad_sync, GradShardSync):  # ZeRO-2: each rank holds another slice, so the ranks meet
            return guard.before_update(step, loss=loss, grads=[self.grad_sync.grad], params=[self.flat_param])
        grads = [self.grad_sync.flat_grad] if self.precision.scaler is None else []
        if self.kind != "local_sgd":  # "allreduce": every rank holds the same synced gradient and parameters
            return guard.before_update(step, loss=loss, grads=grads, params=[self.flat_param],
                                       shared=self.kind == "allreduce")
        if guard.on_divergence == "skip":
            raise ValueError("train.on_divergence = 'skip' does not go with sync.kind = 'local_sgd' (its ranks do not "
                             "meet every step to agree on a skip); use 'stop'")
        guard.note(step, loss=loss, grads=grads, params=[self.flat_param])  # no collective: agreed before averaging
        return True

    def _broadcast_from_root(self) -> None:
        if self.world_size == 1:
            return
        dist.broadcast(self.flat_param, src=self._root, group=self.group)
        nbytes = self.flat_param.numel() * self.flat_param.element_size()
        if self.rank == 0:
            self.broadcast_stats.bytes_sent += nbytes * (self.world_size - 1)  # as a flat broadcast would
        else:
            self.broadcast_stats.bytes_recv += nbytes

    def average_params(self) -> None:
        """Local SGD: replace every replica's parameters by their mean."""
        self.allreduce.all_reduce(self.flat_param)
        self.flat_param.div_(self.world_size)

    # ---- counters and state ---------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.flat_param.numel()

    def full_params(self) -> torch.Tensor:
        """All parameters as one flat tensor (the buffer itself: every replica holds them all)."""
        return self.flat_param

    def local_params(self) -> list[torch.Tensor]:
        """The parameters this rank holds (all of them), for the divergence check before a checkpoint."""
        return [self.flat_param]

    def load_full_params(self, flat: torch.Tensor) -> None:
        self.flat_param.copy_(flat)

    def bytes_moved(self) -> tuple[int, int]:
        stats = [self.allreduce.stats, self.broadcast_stats] + ([self.zero.stats] if self.zero is not None else [])
        if self.grad_sync.stats is not self.allreduce.stats:
            stats.append(self.grad_sync.stats)
        return sum(s.bytes_sent for s in stats), sum(s.bytes_recv for s in stats)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as flat tensors, laid out as `flat_param` (empty: no state yet, or no optimizer)."""
        if self.zero is not None:
            return self.zero.full_state()  # collective: every rank's slices
        return flat_state(self.optimizer, self.params) if self.optimizer is not None else {}

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        if self.zero is not None:
            self.zero.load_full_state(flat)
        elif self.optimizer is not None:
            load_flat_state(self.optimizer, self.params, flat)

    @property
    def has_residuals(self) -> bool:
        """Whether gradients are compressed with error feedback (the residuals are then training state)."""
        return self.grad_sync.op == "compressed" and self.grad_sync.compressor.error_feedback

    def residual_flat(self) -> torch.Tensor:
        """This rank's error-feedback residuals as one flat tensor, laid out as the flat gradient."""
        sync = self.grad_sync
        return sync.compressor.residuals(self._bucket_bounds(), sync.flat_grad)

    def load_residual_flat(self, flat: torch.Tensor) -> None:
        sync = self.grad_sync
        sync.compressor.load_residuals(flat.to(sync.flat_grad.device), self._bucket_bounds())

    @property
    def has_hook_state(self) -> bool:
        """Whether the communication hook has state to checkpoint (one per rank)."""
        return hasattr(self.grad_sync.comm_hook, "state_dict")

    def hook_state(self) -> dict:
        return self.grad_sync.comm_hook.state_dict()

    def load_hook_state(self, state: dict) -> None:
        self.grad_sync.comm_hook.load_state_dict(state)

    def _bucket_bounds(self) -> list[tuple[int, int]]:
        return [(bucket.start, bucket.stop) for bucket in self.grad_sync.buckets]

    def close(self) -> None:
        self.grad_sync.close()
        self.allreduce.close()
