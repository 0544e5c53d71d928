"""Pipeline parallelism: Plait vs torch.distributed.pipelining, measured bubble vs theory, activation memory.

    .venv/bin/python benchmarks/pipeline.py [--quick]

1. Throughput (examples/s) of a training step on the same deep MLP, the same 2-stage split and the same
   micro-batches: Plait's GPipe and 1F1B against torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B,
   interleaved round by round in the same two processes (gloo, one thread per rank). Both start from the same
   weights; the benchmark checks they end a step with the same parameters, so both do the same maths.
2. Bubble: the idle share of the two stages, measured from each stage's busy intervals (timestamps of every
   forward and backward on one machine-wide clock), against (p-1)/(m+p-1). Twice: on the MLP (compute-bound, so
   it also measures how much CPU the two ranks really get on a shared machine), and on timed stages whose forward
   and backward sleep 4 and 8 ms (exactly equal stages, as the formula assumes; this isolates the runtime's own
   overhead: messages, scheduling, Python between actions).
3. Peak activation memory per stage (bytes autograd saves plus what the stage stashes), GPipe vs 1F1B (and 1F1B
   with recomputation), 4 stages × 8 micro-batches.
The last line is the headline: Plait 1F1B throughput over torch's Schedule1F1B.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
import torch.distributed as dist
import torch.nn.functional as F

from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline import (PipelineLayout, PipelineStage, balance_by_params, bubble_theory, build_schedule,
                                     split_layers)
from plait.parallel.pipeline.model import deep_mlp

# Eight identical 1024×1024 Linear+ReLU blocks and a 10-way head: split by parameter count, the stages are equal
# to within the head (1% of a block), as the bubble formula assumes.
DEPTH, HIDDEN, BATCH, MICRO = 9, 1024, 256, 8


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return deep_mlp(depth=DEPTH, hidden=HIDDEN, in_features=HIDDEN)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, HIDDEN, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds_fwd, seconds_bwd):
        time.sleep(seconds_fwd)
        ctx.seconds_bwd = seconds_bwd
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds_bwd)
        return grad, None, None


class _TimedStage(nn.Module):
    """A stage that takes a fixed time: forward sleeps 4 ms, backward 8 ms, whatever else runs on the machine."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # so stage 0's output needs a backward

    def forward(self, x):
        return _Sleep.apply(x * self.scale, 0.004, 0.008)  # scale first: stage 0's input needs no gradient


class _TimedHead(_TimedStage):
    def forward(self, x):
        return super().forward(x)[:, :10]


def _bubble_of(runner_step, record_of, world_size: int, steps: int) -> float:
    samples = []
    for step in range(steps):
        dist.barrier()
        runner_step(step)
        iv = record_of()
        mine = torch.tensor([min(a for _, _, a, _ in iv), -max(b for _, _, _, b in iv),
                             sum(b - a for _, _, a, b in iv)], dtype=torch.float64)
        gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        start = min(float(g[0]) for g in gathered)
        end = max(-float(g[1]) for g in gathered)
        busy = sum(float(g[2]) for g in gathered)
        samples.append(1.0 - busy / (world_size * (end - start)))
    return statistics.median(samples)


class _Plait:
    def __init__(self, module, placement, schedule_name, micro):
        self.module, self.placement = module, placement
        self.stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if placement.is_last else None)
        self.schedule = build_schedule(schedule_name, placement.num_stages, micro)
        self.opt = torch.optim.SGD(module.parameters(), lr=0.01)
        self.record = None

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        self.record = self.stage.train_step(self.schedule, BATCH, x if self.placement.is_first else None,
                                            y if self.placement.is_last else None)
        self.opt.step()


class _Torch:
    def __init__(self, module, placement, schedule_name, micro):
        from torch.distributed.pipelining import PipelineStage as TorchStage, Schedule1F1B, ScheduleGPipe

        self.module, self.placement = module, placement
        stage = TorchStage(module, placement.stage, placement.num_stages, torch.device("cpu"))
        cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        self.schedule = cls(stage, n_microbatches=micro, loss_fn=F.cross_entropy)  # mean over m micro-batch means
        self.opt = torch.optim.SGD(module.parameters(), lr=0.01)

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        if self.placement.is_first:
            self.schedule.step(x)
        elif self.placement.is_last:
            self.schedule.step(target=y)
        else:
            self.schedule.step()
        self.opt.step()


def _timed(runner, steps: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        runner.step(*_batch(step % 4))
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def _bench_rank(rank: int, world_size: int, steps: int, rounds: int, micro_counts: list[int]) -> dict:
    layout = PipelineLayout(replicas=1, stages=world_size)
    placement = layout.placement(rank)
    model = _model()
    bounds = balance_by_params(model, world_size)
    module = split_layers(model, bounds)[rank]
    out: dict = {"bounds": bounds}
    # same maths: one step of each from the same weights ends with the same parameters
    diffs = {}
    for name in ("gpipe", "1f1b"):
        a = _Plait(copy.deepcopy(module), placement, name, MICRO)
        b = _Torch(copy.deepcopy(module), placement, name, MICRO)
        a.step(*_batch(0))
        b.step(*_batch(0))
        diffs[name] = max(float((p - q).detach().abs().max()) for p, q in zip(a.module.parameters(), b.module.parameters()))
    out["max_param_diff"] = diffs
    runners = {f"{lib}-{name}": cls(copy.deepcopy(module), placement, name, MICRO)
               for name in ("gpipe", "1f1b") for lib, cls in (("plait", _Plait), ("torch", _Torch))}
    for runner in runners.values():
        _timed(runner, 2)  # warm-up: shapes, first allocations
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):  # interleaved, so both libraries see the same machine load
        for key, runner in runners.items():
            times[key].append(_timed(runner, steps))
    out["step_seconds"] = {key: statistics.median(v) for key, v in times.items()}
    # bubble: Plait 1F1B and GPipe at several micro-batch counts, from busy intervals
    bubbles, timed = {}, {}
    x0, y0 = _batch(0)
    for name in ("gpipe", "1f1b"):
        for micro in micro_counts:
            runner = _Plait(copy.deepcopy(module), placement, name, micro)
            runner.step(*_batch(0))
            bubbles[f"{name}-m{micro}"] = _bubble_of(lambda step: runner.step(*_batch(step % 4)),
                                                     lambda: runner.record.intervals, world_size, steps)
            stage = PipelineStage(_TimedHead() if placement.is_last else _TimedStage(), placement,
                                  loss_fn=F.cross_entropy if placement.is_last else None)
            schedule = build_schedule(name, world_size, micro)
            step_fn = lambda step: stage.train_step(schedule, BATCH, x0 if placement.is_first else None,  # noqa: E731
                                                    y0 if placement.is_last else None)
            holder = {}
            timed[f"{name}-m{micro}"] = _bubble_of(lambda step: holder.update(r=step_fn(step)),
                                                   lambda: holder["r"].intervals, world_size, steps)
    out["bubble"] = bubbles
    out["bubble_timed"] = timed
    return out


def _memory_rank(rank: int, world_size: int) -> dict:
    layout = PipelineLayout(replicas=1, stages=world_size)
    placement = layout.placement(rank)
    model = _model()
    module = split_layers(model, balance_by_params(model, world_size))[rank]
    peaks = {}
    for name, recompute in (("gpipe", False), ("1f1b", False), ("1f1b-recompute", True)):
        stage = PipelineStage(copy.deepcopy(module), placement, loss_fn=F.cross_entropy if placement.is_last else None,
                              recompute=recompute)
        schedule = build_schedule(name.split("-")[0], world_size, MICRO)
        x, y = _batch(0)
        stage.train_step(schedule, BATCH, x if placement.is_first else None, y if placement.is_last else None)
        peaks[name] = stage.meter.peak_bytes
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (a few minutes)")
    args = parser.parse_args()
    steps, rounds = (4, 3) if args.quick else (10, 5)
    micro_counts = [2, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    lines = []

    mem = spawn_ranks(_memory_rank, 4, timeout_s=600)
    for stage, peaks in enumerate(mem):
        print(f"stage {stage}: peak activation MiB  gpipe {peaks['gpipe'] / 2**20:.2f}  1f1b "
              f"{peaks['1f1b'] / 2**20:.2f}  1f1b+recompute {peaks['1f1b-recompute'] / 2**20:.2f}")
    lines.append({"benchmark": "pipeline", "metric": "peak_activation_bytes_stage0_p4_m8",
                  "plait": mem[0]["1f1b"], "reference": mem[0]["gpipe"], "ratio": mem[0]["1f1b"] / mem[0]["gpipe"],
                  "goal": "1F1B below GPipe (theory 4/8 of the micro-batch activations on stage 0)"})

    res = spawn_ranks(_bench_rank, 2, steps, rounds, micro_counts, timeout_s=1800)[0]
    print(f"split {res['bounds']}; max |param diff| after one step, Plait vs torch: {res['max_param_diff']}")
    for key, sec in res["step_seconds"].items():
        print(f"{key:12s} {sec * 1e3:8.1f} ms/step  {BATCH / sec:8.0f} examples/s")
    for label, table in (("mlp", res["bubble"]), ("timed", res["bubble_timed"])):
        for key, measured in table.items():
            micro = int(key.split("-m")[1])
            theory = bubble_theory(2, micro)
            print(f"bubble {label:5s} {key:10s} measured {measured:.3f}  theory {theory:.3f}  "
                  f"relative error {(measured - theory) / theory:+.1%}")
            lines.append({"benchmark": "pipeline", "metric": f"bubble_fraction_{label}_{key}_p2", "plait": measured,
                          "reference": theory, "ratio": measured / theory,
                          "goal": "within 10% of (p-1)/(m+p-1)"})
    sec = res["step_seconds"]
    for name in ("gpipe", "1f1b"):
        lines.append({"benchmark": "pipeline", "metric": f"throughput_{name}_examples_per_s",
                      "plait": BATCH / sec[f"plait-{name}"], "reference": BATCH / sec[f"torch-{name}"],
                      "ratio": sec[f"torch-{name}"] / sec[f"plait-{name}"], "goal": ">= 1.0"})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
