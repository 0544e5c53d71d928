"""One pipeline stage on one rank: runs its row of a schedule, exchanging activations and gradients with its
neighbours over point-to-point, and records when it was busy.

Every rank calls `train_step` (or `forward_step`) with the same schedule and batch size; only the first stage
passes inputs and only the last passes targets. Gradients accumulate in the stage's parameters over the
micro-batches (each micro-batch's loss is scaled by its share of the batch, so the sum is the batch-mean loss's
gradient); the caller then all-reduces across replicas if any, and steps its optimizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from plait.parallel.pipeline.schedule import Schedule
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
    """Where a stage sits: its index and the global ranks of its neighbours (None at the ends)."""
    stage: int
    num_stages: int
    prev_rank: int | None
    next_rank: int | None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


@dataclass(slots=True)
class StepRecord:
    """What one step did on this stage: busy intervals (kind, micro-batch, start, end) and the summed loss."""
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


class PipelineStage:
    def __init__(self, module: nn.Module, placement: Placement,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 recompute: bool = False, meter: ActivationMeter | None = None, precision: str = "fp32",
                 device: torch.device | None = None):
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
        self.module = module
        self.placement = placement
        self.loss_fn = loss_fn
        self.recompute = recompute  # keep only each micro-batch's input; redo the forward inside the backward
        self.meter = meter or ActivationMeter(module.parameters())
        self._shapes: dict[int, _Shapes] = {}

    # -- shapes ---------------------------------------------------------------------------------------------------
    def _negotiate(self, sizes: list[int], sample: torch.Tensor | None) -> None:
        """Agree on the shapes of each new micro-batch size, in the same order on every stage."""
        where = self.placement
        for size in sorted(set(sizes) - set(self._shapes)):
            if where.is_first:
                if sample is None:
                    raise ValueError("stage 0 needs the input batch")
                in_spec = ((size, *sample.shape[1:]), sample.dtype)
            else:
                header = empty_header(self.device)
                dist.recv(header, where.prev_rank)
                in_spec = decode_header(header)
            try:
                out_spec = infer_output(self.module, *in_spec, self.device, self._autocast)
            except Exception as err:
                raise RuntimeError(f"stage {where.stage}: forward of an input {in_spec[0]} failed: {err}") from err
            if not where.is_last:
                dist.send(encode_header(*out_spec, self.device), where.next_rank)
            self._shapes[size] = _Shapes(in_spec, out_spec)

    # -- training -------------------------------------------------------------------------------------------------
    def train_step(self, schedule: Schedule, batch_size: int, inputs: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None) -> StepRecord:
        where = self.placement
        if schedule.num_stages != where.num_stages or schedule.forward_only:
            raise ValueError(f"stage {where.stage}: schedule {schedule.name!r} does not fit a "
                             f"{where.num_stages}-stage training pipeline")
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
        recvs = RecvAhead([self._recv_spec(a, sizes) for a in row], device=self.device)
        sends = SendHandles()
        stash: dict[int, tuple] = {}
        losses = []
        for index, action in enumerate(row):
            k = action.micro_batch
            received = recvs.get(index)
            if action.kind == "F":
                if where.is_first:
                    x, held = x_parts[k], None
                else:
                    x = received
                    x.requires_grad_(x.is_floating_point())
                    held = self.meter.hold(x)
                t0 = now()
                if self.recompute:
                    with torch.no_grad():
                        out = self._forward(x, y_parts, k, sizes, batch_size)
                    kept = None
                else:
                    with self.meter.recording():
                        out = self._forward(x, y_parts, k, sizes, batch_size)
                    kept = out if where.is_last else (out, self.meter.hold(out))
                record.intervals.append(("F", k, t0, now()))
                if where.is_last:
                    losses.append(out.detach())
                else:
                    sends.isend(out.detach(), where.next_rank)
                stash[k] = (x, held, kept)
            else:
                x, held, kept = stash.pop(k)
                grad = received
                t0 = now()
                if self.recompute:
                    with torch.enable_grad(), self.meter.recording():
                        kept = self._forward(x, y_parts, k, sizes, batch_size)
                out = kept if where.is_last else kept[0] if isinstance(kept, tuple) else kept
                if where.is_last:
                    out.backward()
                else:
                    out.backward(grad)
                record.intervals.append(("B", k, t0, now()))
                if not where.is_first:
                    sends.isend(x.grad, where.prev_rank)
                del x, held, kept, out
        sends.wait()  # every activation and gradient this stage sent has left before the optimizer touches weights
        record.end = now()
        if where.is_first:
            self.meter.include(inputs)
        if losses:
            record.loss = torch.stack(losses).sum()
        return record

    def _recv_spec(self, action, sizes: list[int]):
        where = self.placement
        if action.kind == "F" and not where.is_first:
            return (*self._shapes[sizes[action.micro_batch]].input, where.prev_rank)
        if action.kind == "B" and not where.is_last:
            return (*self._shapes[sizes[action.micro_batch]].output, where.next_rank)
        return None

    def _autocast(self):
        return autocast_for(self.precision, self.device)

    def _forward(self, x, y_parts, k: int, sizes: list[int], batch_size: int) -> torch.Tensor:
        with self._autocast():
            out = self.module(x)
            if self.placement.is_last:
                # micro-batch k's share of the batch-mean loss: the summed gradients equal the whole batch's
                return self.loss_fn(out, y_parts[k]).float() * (sizes[k] / batch_size)
        return out

    # -- inference ------------------------------------------------------------------------------------------------
    def forward_step(
        self, schedule: Schedule, batch_size: int, inputs: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Forward-only pipelined pass; the last stage returns the outputs for the whole batch, the others None."""
        where = self.placement
        if not schedule.forward_only or schedule.num_stages != where.num_stages:
            raise ValueError(f"stage {where.stage}: schedule {schedule.name!r} is not a forward-only schedule "
                             f"for {where.num_stages} stages")
        sizes = micro_batch_sizes(batch_size, schedule.num_micro_batches)
        self._negotiate(sizes, inputs)
        x_parts = torch.tensor_split(inputs, schedule.num_micro_batches) if where.is_first else None
        row = schedule.actions[where.stage]
        recvs = RecvAhead([self._recv_spec(a, sizes) for a in row], device=self.device)
        sends = SendHandles()
        outputs: dict[int, torch.Tensor] = {}
        was_training = self.module.training
        self.module.eval()  # inference: dropout off, batch norm uses its running statistics
        try:
            with torch.no_grad():
                for index, action in enumerate(row):
                    k = action.micro_batch
                    received = recvs.get(index)
                    x = x_parts[k] if where.is_first else received
                    with self._autocast():
                        out = self.module(x)
                    if where.is_last:
                        outputs[k] = out
                    else:
                        sends.isend(out, where.next_rank)
            sends.wait()
        finally:
            self.module.train(was_training)
        return torch.cat([outputs[k] for k in range(schedule.num_micro_batches)]) if where.is_last else None
