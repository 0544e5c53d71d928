"""`sync.kind = "sharded"`: fully sharded data parallel on PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each rank keeps 1/n of every parameter, of its gradient and of the optimizer state (ZeRO-3). Every top-level child
module that holds parameters is one FSDP unit, the root another: a unit's parameters are all-gathered just before
its forward (and again before its backward), its gradients reduce-scattered (averaged) as soon as its backward is
done, and the optimizer steps on the local shards (DTensors). Per step each rank moves about 3(n−1)/n of the
parameter bytes (two all-gathers and one reduce-scatter) against plain data parallel's 2(n−1)/n, and holds 1/n of
the state: the trade for models that do not fit one device.

The trainer sees the same surface as `DataParallel` (train_step, broadcast_params, bytes_moved, and the
checkpoint's flat parameters and flat optimizer state, so sharded and plain runs resume from each other's
checkpoints). Gathering or loading the full parameters or state is collective: every rank calls it.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from plait.parallel.collectives import CommStats
from plait.parallel.data_parallel import PLAIN_SGD, LossFn, StepTimes
from plait.parallel.dims import ParallelDims
from plait.parallel.divergence import DivergenceGuard
from plait.parallel.optim import OptimizerFactory, optimizer_name
from plait.parallel.precision import MixedPrecision


class ShardedDataParallel:
    kind = "sharded"
    has_residuals = False  # no compression: nothing but the parameters and the optimizer state to checkpoint
    has_hook_state = False  # no communication hooks either

    def __init__(self, model: nn.Module, dims: ParallelDims, *, optimizer: OptimizerFactory = PLAIN_SGD,
                 precision: str = "fp32", loss_fn: LossFn = nn.functional.cross_entropy):
        if precision == "fp16":
            # a grad scaler over shards would have to agree on overflows across ranks; bf16 needs no scaler
            raise ValueError("train.precision = 'fp16' does not go with sync.kind = 'sharded'; use 'bf16'")
        first = next(model.parameters())
        self.device = first.device
        self.model, self.loss_fn = model, loss_fn
        self.group = dims.grad_group
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self._root = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self.mesh = DeviceMesh.from_group(self.group or dist.group.WORLD, self.device.type)
        if self.world_size > 1:
            # rank 0's weights everywhere *before* sharding: each rank keeps a slice of its own copy, so a copy that
            # differed would leave a model stitched from several ranks' weights
            with torch.no_grad():
                for p in model.parameters():
                    dist.broadcast(p.data, src=self._root, group=self.group)
        units = [child for child in model.children() if any(True for _ in child.parameters())]
        for unit in units:  # children first, then the root (it takes what no child holds)
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)  # full (unsharded) count
        self.precision = MixedPrecision(precision, self.device)
        self.optimizer = optimizer(self.params)  # over the local shards
        self.optimizer_name = optimizer_name(self.optimizer)
        self.stats = CommStats()

    # ---- replicas start equal -------------------------------------------------------------------------------------
    def broadcast_params(self) -> None:
        """Nothing left to do: the constructor broadcast rank 0's parameters before sharding them."""

    # ---- one step -------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int,
                   delay_s: float = 0.0, guard: DivergenceGuard | None = None) -> tuple[torch.Tensor, StepTimes]:
        start = time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)
        total = torch.zeros((), device=self.device)
        last = len(micro_batches) - 1
        for i, (x, y) in enumerate(micro_batches):
            self.model.set_requires_gradient_sync(i == last)  # accumulate locally, reduce-scatter once
            with self.precision.autocast():
                loss = self.loss_fn(self.model(x), y) / len(micro_batches)
            loss.backward()
            total += loss.detach().float()
        computed = time.perf_counter()
        if guard is None or guard.before_update(step, loss=total, params=self.local_params(),
                                                grads=[p.grad.to_local() for p in self.params if p.grad is not None]):
            self.optimizer.step()  # the check above: this rank's shards of the averaged gradient, shared by none
        self.optimizer.zero_grad(set_to_none=True)
        self._count(len(micro_batches))
        end = time.perf_counter()
        # FSDP overlaps its all-gathers and reduce-scatters with forward and backward: they are inside compute_s
        return total, StepTimes(compute_s=computed - start, comm_s=0.0, total_s=end - start)

    def _count(self, micro_batches: int) -> None:
        """Bytes as a ring moves them (an estimate, as for the native all-reduce): per micro-batch an all-gather
        before forward and one before backward, then one reduce-scatter of the gradients."""
        n = self.world_size
        if n == 1:
            return
        size = self.num_params * self.params[0].element_size()
        moved = (2 * micro_batches + 1) * (n - 1) * size // n
        self.stats.bytes_sent += moved
        self.stats.bytes_recv += moved

    def bytes_moved(self) -> tuple[int, int]:
        return self.stats.bytes_sent, self.stats.bytes_recv

    # ---- full parameters and optimizer state (collective) -----------------------------------------------------------
    def full_params(self) -> torch.Tensor:
        """The full parameters laid end to end in `model.parameters()` order (DataParallel's flat layout)."""
        return torch.cat([p.full_tensor().reshape(-1) for p in self.params])

    def local_params(self) -> list[torch.Tensor]:
        """This rank's shards of the parameters, for the divergence check before a checkpoint."""
        return [p.to_local() for p in self.params]

    def load_full_params(self, flat: torch.Tensor) -> None:
        if flat.numel() != self.num_params:
            raise ValueError(f"{flat.numel()} parameters given, the model has {self.num_params}: was model.name "
                             "changed?")
        offset = 0
        with torch.no_grad():
            for p in self.params:
                full = flat[offset:offset + p.numel()].view(p.shape).to(self.device)
                p.to_local().copy_(_local_shard(full, p))
                offset += p.numel()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        states = [self.optimizer.state.get(p) for p in self.params]
        if not states or any(not s for s in states):
            return {}
        flat = {}
        for key, value in states[0].items():
            if isinstance(value, DTensor):
                flat[key] = torch.cat([s[key].full_tensor().reshape(-1) for s in states])
            elif isinstance(value, torch.Tensor):
                flat[key] = value.detach().clone()  # Adam's step count: the same on every rank
        return flat

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        for key, value in flat.items():
            if value.dim() > 0 and value.numel() != self.num_params:
                raise ValueError(f"optimizer state {key!r} holds {value.numel()} values, the parameters "
                                 f"{self.num_params}: was the model changed?")
        offset = 0
        for p in self.params:
            state = self.optimizer.state[p]
            for key, value in flat.items():
                if value.dim() == 0:
                    state[key] = value.detach().cpu().clone()  # torch.optim keeps step counts on the host
                else:
                    full = value[offset:offset + p.numel()].view(p.shape).to(self.device)
                    state[key] = DTensor.from_local(_local_shard(full, p).clone(), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride())
            offset += p.numel()

    def close(self) -> None:
        pass


def _local_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of `full`, cut as `like` is cut (FSDP2: dim 0, ranks beyond the size hold empty shards)."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
