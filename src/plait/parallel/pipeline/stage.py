"""One pipeline stage on one rank: runs its row of a schedule, exchanging activations and gradients with its
neighbours over point-to-point, and records when it was busy.

A stage holds one module, or, for interleaved schedules, v model chunks (a list): chunk c of stage s is virtual stage
c·p + s, so the last stage's chunk c sends into the first stage's chunk c+1 (`Placement.wrap_rank`). A backward that
the schedule splits into B and W (zero bubble) runs through `split_backward.SplitBackward`.

Every rank calls `train_step` (or `forward_step`) with the same schedule and batch size; only the first stage
passes inputs and only the last passes targets. Gradients accumulate in the stage's parameters over the
micro-batches (each micro-batch's loss is scaled by its share of the batch, so the sum is the batch-mean loss's
gradient); the caller then all-reduces across replicas if any, and steps its optimizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.pipeline.comm import (
    RecvAhead,
    SendHandles,
    decode_header,
    empty_header,
    encode_header,
    infer_output,
)
from plait.parallel.pipeline.memory import ActivationMeter
from plait.parallel.pipeline.schedule import Action, Schedule, split_backwards
from plait.parallel.pipeline.split_backward import SplitBackward
from plait.parallel.precision import autocast_for, check_precision


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine, so stages' intervals line up."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def micro_batch_sizes(batch_size: int, num_micro_batches: int) -> list[int]:
    if batch_size < num_micro_batches:
        raise ValueError(f"a batch of {batch_size} cannot be split into parallel.micro_batches = {num_micro_batches}")
    base, extra = divmod(batch_size, num_micro_batches)
    return [base + (1 if k < extra else 0) for k in range(num_micro_batches)]  # as torch.tensor_split does


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a stage sits: its index and the global ranks of its neighbours (None at the ends). `wrap_rank`, for
    interleaved schedules: on the first stage the last stage's rank, on the last stage the first's (None elsewhere)."""
    stage: int
    num_stages: int
    prev_rank: int | None
    next_rank: int | None
    wrap_rank: int | None = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass(slots=True)
class StepRecord:
    """What one step did on this stage: busy intervals (kind F/B/W, micro-batch, start, end) and the summed loss."""
    intervals: list[tuple[str, int, float, float]] = field(default_factory=list)
    loss: torch.Tensor | None = None  # last stage only: batch-mean loss of this replica (no host sync)
    start: float = 0.0
    end: float = 0.0

    @property
    def busy(self) -> float:
        return sum(b - a for _, _, a, b in self.intervals)


@dataclass(frozen=True, slots=True)
class _Shapes:
    input: tuple[tuple[int, ...], torch.dtype]
    output: tuple[tuple[int, ...], torch.dtype]


@dataclass(slots=True)
class _Pending:
    """What a forward leaves for its backward: the input, meter handles of what the stage keeps, and the graph (the
    output or loss; a SplitBackward when B and W are separate; None when the backward recomputes)."""
    x: torch.Tensor
    handles: list
    graph: torch.Tensor | SplitBackward | None


class PipelineStage:
    def __init__(self, module: nn.Module | Sequence[nn.Module], placement: Placement,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 recompute: bool = False, meter: ActivationMeter | None = None, precision: str = "fp32",
                 device: torch.device | None = None):
        """`module`: the stage, or its v chunks (a list or nn.ModuleList) for an interleaved schedule; then
        `self.module` is an nn.ModuleList of them (one module for the optimizer, the all-reduce, checkpoints)."""
        if isinstance(module, (list, tuple)):
            module = nn.ModuleList(module)
        self.chunks: list[nn.Module] = list(module) if isinstance(module, nn.ModuleList) else [module]
        if not self.chunks:
            raise ValueError(f"stage {placement.stage}: no model chunk given")
        if placement.is_last and loss_fn is None:
            raise ValueError(f"stage {placement.stage}: the last stage needs a loss function")
        check_precision(precision)
        if precision == "fp16":
            # each stage would need the others' overflow verdict before stepping: one scaler for the whole pipeline
            raise ValueError("train.precision = 'fp16' is not supported by the pipeline (its grad scaler would have "
                             "to agree across stages); use 'bf16'")
        first = next(iter(module.parameters()), None)
        if device is None and first is None:
            raise ValueError(f"stage {placement.stage} has no parameters to tell its device: pass device=")
        self.device = device if device is not None else first.device  # every tensor the stage makes lives here
        self.precision = precision
        self.module: nn.Module = module
        self.placement = placement
        self.loss_fn = loss_fn
        self.recompute = recompute  # keep only each micro-batch's input; redo the forward inside the backward
        self.meter = meter or ActivationMeter(module.parameters())
        self._shapes: dict[int, list[_Shapes]] = {}  # micro-batch size -> per chunk

    # -- where things are -----------------------------------------------------------------------------------------
    @property
    def _num_virtual(self) -> int:
        return self.placement.num_stages * len(self.chunks)

    def _neighbour(self, step: int) -> int:
        """The rank holding the virtual stage before (step -1) or after (+1) one of this stage's (wrapping around)."""
        where = self.placement
        rank = where.prev_rank if step < 0 else where.next_rank
        if rank is None:
            rank = where.wrap_rank
        if rank is None:
            raise ValueError(f"stage {where.stage}: {len(self.chunks)} chunks per stage need Placement.wrap_rank "
                             "(the rank of the stage at the other end of the pipeline; PipelineLayout sets it)")
        return rank

    def _check_fits(self, schedule: Schedule, forward_only: bool) -> None:
        where = self.placement
        if (schedule.num_stages, schedule.chunks_per_rank, schedule.forward_only) != \
                (where.num_stages, len(self.chunks), forward_only):
            kind = "forward-only" if forward_only else "training"
            raise ValueError(f"stage {where.stage}: schedule {schedule.name!r} ({schedule.num_stages} stages × "
                             f"{schedule.chunks_per_rank} chunks{', forward-only' if schedule.forward_only else ''}) "
                             f"does not fit a {where.num_stages}-stage {kind} pipeline with {len(self.chunks)} "
                             "chunk(s) per stage")

    # -- shapes ---------------------------------------------------------------------------------------------------
    def _negotiate(self, sizes: list[int], sample: torch.Tensor | None) -> None:
        """Agree on the shapes of each new micro-batch size, in the same order on every stage: per size, chunk by
        chunk along the virtual stages (the header travels 0 -> 1 -> ... -> P-1, wrapping to the first stage)."""
        where = self.placement
        for size in sorted(set(sizes) - set(self._shapes)):
            specs = []
            for chunk, module in enumerate(self.chunks):
                virtual = chunk * where.num_stages + where.stage
                if virtual == 0:
                    if sample is None:
                        raise ValueError("stage 0 needs the input batch")
                    in_spec = ((size, *sample.shape[1:]), sample.dtype)
                else:
                    header = empty_header(self.device)
                    dist.recv(header, self._neighbour(-1))
                    in_spec = decode_header(header)
                try:
                    out_spec = infer_output(module, *in_spec, self.device, self._autocast)
                except Exception as err:
                    name = f"stage {where.stage}" if len(self.chunks) == 1 else f"virtual stage {virtual}"
                    raise RuntimeError(f"{name}: forward of an input {in_spec[0]} failed: {err}") from err
                if virtual < self._num_virtual - 1:
                    dist.send(encode_header(*out_spec, self.device), self._neighbour(+1))
                specs.append(_Shapes(in_spec, out_spec))
            self._shapes[size] = specs

    # -- training -------------------------------------------------------------------------------------------------
    def train_step(self, schedule: Schedule, batch_size: int, inputs: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None) -> StepRecord:
        where = self.placement
        self._check_fits(schedule, forward_only=False)
        sizes = micro_batch_sizes(batch_size, schedule.num_micro_batches)
        self._negotiate(sizes, inputs)
        x_parts = torch.tensor_split(inputs, schedule.num_micro_batches) if where.is_first else None
        y_parts = torch.tensor_split(targets, schedule.num_micro_batches) if where.is_last else None
        if where.is_last and targets is None:
            raise ValueError(f"stage {where.stage}: the last stage needs the targets")
        if where.is_first:
            self.meter.exclude(inputs)
        record = StepRecord(start=now())
        row = schedule.actions[where.stage]
        split = split_backwards(row)  # (virtual stage, micro-batch) whose weight gradients wait for a W
        last = self._num_virtual - 1
        recvs = RecvAhead([self._recv_spec(a, sizes) for a in row], device=self.device)
        sends = SendHandles()
        stash: dict[tuple[int, int], _Pending] = {}
        losses = []
        for index, action in enumerate(row):
            k, virtual = action.micro_batch, action.stage
            chunk = virtual // where.num_stages
            received = recvs.get(index)
            if action.kind == "F":
                if virtual == 0:
                    x, handles = x_parts[k], []
                else:
                    x = received
                    x.requires_grad_(x.is_floating_point())
                    handles = [self.meter.hold(x)]
                t0 = now()
                if self.recompute:
                    with torch.no_grad():
                        out = self._forward(chunk, x, y_parts, k, sizes, batch_size)
                    graph = None
                else:
                    with self.meter.recording():
                        graph = self._forward(chunk, x, y_parts, k, sizes, batch_size, (virtual, k) in split)
                    out = graph.output if isinstance(graph, SplitBackward) else graph
                    if virtual < last:
                        handles.append(self.meter.hold(out))
                record.intervals.append(("F", k, t0, now()))
                if virtual == last:
                    losses.append(out.detach())
                else:
                    sends.isend(out.detach(), self._neighbour(+1))
                stash[(virtual, k)] = _Pending(x, handles, graph)
                del out, graph
            elif action.kind == "B":
                deferred = (virtual, k) in split
                pending = stash[(virtual, k)] if deferred else stash.pop((virtual, k))
                t0 = now()
                if self.recompute:
                    with torch.enable_grad(), self.meter.recording():
                        pending.graph = self._forward(chunk, pending.x, y_parts, k, sizes, batch_size, deferred)
                if isinstance(pending.graph, SplitBackward):
                    input_grad = pending.graph.backward_input(received)  # W computes the weight gradients later
                else:
                    pending.graph.backward(received)  # None on the last virtual stage: the loss is a scalar
                    input_grad = pending.x.grad
                record.intervals.append(("B", k, t0, now()))
                if virtual > 0:
                    sends.isend(input_grad, self._neighbour(-1))
                del pending, input_grad
            else:  # W: the weight gradients its B left
                pending = stash.pop((virtual, k))
                t0 = now()
                pending.graph.backward_weight()
                record.intervals.append(("W", k, t0, now()))
                del pending
        sends.wait()  # every activation and gradient this stage sent has left before the optimizer touches weights
        record.end = now()
        if where.is_first:
            self.meter.include(inputs)
        if losses:
            record.loss = torch.stack(losses).sum()
        return record

    def _recv_spec(self, action: Action, sizes: list[int]):
        shapes = self._shapes[sizes[action.micro_batch]][action.stage // self.placement.num_stages]
        if action.kind == "F" and action.stage > 0:
            return (*shapes.input, self._neighbour(-1))
        if action.kind == "B" and action.stage < self._num_virtual - 1:
            return (*shapes.output, self._neighbour(+1))
        return None

    def _autocast(self):
        return autocast_for(self.precision, self.device)

    def _forward(self, chunk: int, x, y_parts, k: int, sizes: list[int], batch_size: int,
                 split: bool = False) -> torch.Tensor | SplitBackward:
        is_last = chunk * self.placement.num_stages + self.placement.stage == self._num_virtual - 1

        def loss(out: torch.Tensor) -> torch.Tensor:
            # micro-batch k's share of the batch-mean loss: the summed gradients equal the whole batch's
            return self.loss_fn(out, y_parts[k]).float() * (sizes[k] / batch_size)

        with self._autocast():
            if split:
                return SplitBackward(self.chunks[chunk], x, loss if is_last else None)
            out = self.chunks[chunk](x)
            return loss(out) if is_last else out

    # -- inference ------------------------------------------------------------------------------------------------
    def forward_step(
        self, schedule: Schedule, batch_size: int, inputs: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Forward-only pipelined pass; the last stage returns the outputs for the whole batch, the others None."""
        where = self.placement
        self._check_fits(schedule, forward_only=True)
        sizes = micro_batch_sizes(batch_size, schedule.num_micro_batches)
        self._negotiate(sizes, inputs)
        x_parts = torch.tensor_split(inputs, schedule.num_micro_batches) if where.is_first else None
        row = schedule.actions[where.stage]
        last = self._num_virtual - 1
        recvs = RecvAhead([self._recv_spec(a, sizes) for a in row], device=self.device)
        sends = SendHandles()
        outputs: dict[int, torch.Tensor] = {}
        was_training = self.module.training
        self.module.eval()  # inference: dropout off, batch norm uses its running statistics
        try:
            with torch.no_grad():
                for index, action in enumerate(row):
                    k, virtual = action.micro_batch, action.stage
                    received = recvs.get(index)
                    x = x_parts[k] if virtual == 0 else received
                    with self._autocast():
                        out = self.chunks[virtual // where.num_stages](x)
                    if virtual == last:
                        outputs[k] = out
                    else:
                        sends.isend(out, self._neighbour(+1))
            sends.wait()
        finally:
            self.module.train(was_training)
        return torch.cat([outputs[k] for k in range(schedule.num_micro_batches)]) if where.is_last else None
