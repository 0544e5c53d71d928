"""Pipeline parallelism: Plait vs torch.distributed.pipelining, measured bubble vs theory, activation memory.

    .venv/bin/python benchmarks/pipeline.py [--quick] [--only memory|bubble|throughput ...]

1. Throughput (examples/s) of a training step on the same deep MLP, the same 2-stage split and the same
   micro-batches (batch 256, 8 micro-batches): Plait's GPipe and 1F1B against torch.distributed.pipelining's
   ScheduleGPipe and Schedule1F1B, interleaved round by round in the same two processes (gloo, one thread per
   rank; the order flips every round), ratio = median over rounds of torch's step time over Plait's in that round.
   Both start from the same weights; the benchmark checks they end a step with the same parameters.
2. Bubble: the idle share of the two stages, measured from each stage's busy intervals (timestamps of every
   forward and backward on one machine-wide clock), against (p-1)/(m+p-1), for several m with a fixed amount of
   work per micro-batch (sizes below). Twice: on the MLP (compute-bound, so on a shared machine it also measures
   how evenly the two ranks get CPU), and on timed stages that sleep (exactly equal stages, as the formula
   assumes; this isolates the runtime's own overhead). Also printed: each stage's busy time (balance) and the
   median latency between an action's input being ready and the action starting.
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline import (
    PipelineLayout,
    PipelineStage,
    balance_by_params,
    bubble_theory,
    build_schedule,
    split_layers,
)
from plait.parallel.pipeline.model import deep_mlp

# Eight identical 1024×1024 Linear+ReLU blocks and a 10-way head: split by parameter count, the stages are equal
# to within the head (1% of a block), as the bubble formula assumes.
DEPTH, HIDDEN, BATCH, MICRO = 9, 1024, 256, 8
# Bubble runs: a fixed amount of work per micro-batch whatever m is (weak scaling: the batch is m × the
# micro-batch). The MLP gets BUBBLE_ROWS rows per micro-batch (≈40 ms forward, 80 ms backward per stage on one
# unloaded core); the timed stages sleep TIMED_FWD and TIMED_BWD. The formula takes communication as free; here
# each dependent action starts ≈0.5-1 ms after its input is ready (message, wake-up, Python), and with p = 2 1F1B
# puts 2m of those on the critical path, so the excess bubble is ≈ 2m × latency / step time. Staying within 10% of
# (p-1)/(m+p-1) needs F + B ≳ 20 × m × latency per micro-batch: ≈120 ms covers m ≤ 8 at 0.7 ms.
BUBBLE_ROWS, TIMED_FWD, TIMED_BWD = 384, 0.040, 0.080


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
    """A stage that takes a fixed time per micro-batch, whatever else runs on the machine (it sleeps, so it needs
    no CPU): exactly equal stages, as the bubble formula assumes."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # so stage 0's output needs a backward

    def forward(self, x):
        return _Sleep.apply(x * self.scale, TIMED_FWD, TIMED_BWD)  # scale first: stage 0's input needs no gradient


class _TimedHead(_TimedStage):
    def forward(self, x):
        return super().forward(x)[:, :10]


_KINDS = {"F": 0.0, "B": 1.0}


def _bubble_of(step_fn, world_size: int, steps: int) -> dict:
    """Run `steps` steps (after one warm-up) and measure from every stage's busy intervals, gathered to all ranks:
    bubble = 1 - sum(busy) / (p x (last end - first start)) per step; each stage's busy time (are the stages
    balanced?); and the runtime's latency: for every action that waited on a neighbour, start minus the moment it
    could have started (the later of its input's producer finishing and this stage's previous action ending)."""
    step_fn(-1)
    bubbles, latencies, busy = [], [], [[] for _ in range(world_size)]
    for step in range(steps):
        dist.barrier()
        intervals = step_fn(step)
        mine = torch.tensor([[_KINDS[kind], k, a, b] for kind, k, a, b in intervals], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)  # every stage runs 2m actions: same shapes everywhere
        ends = {(s, int(kind), int(k)): float(b) for s, g in enumerate(gathered) for kind, k, _, b in g.tolist()}
        start = min(float(g[:, 2].min()) for g in gathered)
        end = max(float(g[:, 3].max()) for g in gathered)
        total = 0.0
        for s, g in enumerate(gathered):
            stage_busy = float((g[:, 3] - g[:, 2]).sum())
            busy[s].append(stage_busy)
            total += stage_busy
            previous = None
            for kind, k, a, b in g.tolist():
                dep = ends.get((s - 1, 0, int(k))) if kind == 0 else ends.get((s + 1, 1, int(k)))
                if dep is not None and (previous is None or dep > previous):
                    latencies.append(a - dep)
                previous = b
        bubbles.append(1.0 - total / (world_size * (end - start)))
    return {"bubble": statistics.median(bubbles),
            "stage_busy_s": [statistics.median(b) for b in busy],
            "latency_s": statistics.median(latencies) if latencies else 0.0}


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
        from torch.distributed.pipelining import PipelineStage as TorchStage
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

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


def _bench_rank(rank: int, world_size: int, steps: int, rounds: int) -> dict:
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
        diffs[name] = max(float((p - q).detach().abs().max())
                          for p, q in zip(a.module.parameters(), b.module.parameters()))
    out["max_param_diff"] = diffs
    runners = {f"{lib}-{name}": cls(copy.deepcopy(module), placement, name, MICRO)
               for name in ("gpipe", "1f1b") for lib, cls in (("plait", _Plait), ("torch", _Torch))}
    for runner in runners.values():
        _timed(runner, 2)  # warm-up: shapes, first allocations
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    for _ in range(rounds):  # interleaved, so both libraries see the same machine load; order flips every round
        for key in order:
            times[key].append(_timed(runners[key], steps))
        order.reverse()
    out["step_seconds"] = {key: statistics.median(v) for key, v in times.items()}
    # per-round ratios (torch time / Plait time of the same round): robust to the load drifting between rounds
    out["ratios"] = {name: [t / p for t, p in zip(times[f"torch-{name}"], times[f"plait-{name}"])]
                     for name in ("gpipe", "1f1b")}
    return out


def _bubble_rank(rank: int, world_size: int, steps: int, micro_counts: list[int]) -> dict:
    """Bubble at several micro-batch counts m with a fixed amount of work per micro-batch (the batch grows with m,
    BUBBLE_ROWS rows per micro-batch), so the fixed per-action costs weigh the same at every m."""
    layout = PipelineLayout(replicas=1, stages=world_size)
    placement = layout.placement(rank)
    model = _model()
    module = split_layers(model, balance_by_params(model, world_size))[rank]
    out: dict = {"mlp": {}, "timed": {}}
    for name in ("gpipe", "1f1b"):
        for micro in micro_counts:
            batch = micro * BUBBLE_ROWS
            gen = torch.Generator().manual_seed(micro)
            x, y = torch.randn(batch, HIDDEN, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
            schedule = build_schedule(name, world_size, micro)
            for label, stage_module in (("mlp", copy.deepcopy(module)),
                                        ("timed", _TimedHead() if placement.is_last else _TimedStage())):
                stage = PipelineStage(stage_module, placement, loss_fn=F.cross_entropy if placement.is_last else None)

                def step_fn(step, stage=stage, schedule=schedule, batch=batch, x=x, y=y):
                    stage.module.zero_grad(set_to_none=True)
                    return stage.train_step(schedule, batch, x if placement.is_first else None,
                                            y if placement.is_last else None).intervals

                out[label][f"{name}-m{micro}"] = _bubble_of(step_fn, world_size, steps)
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
    parser.add_argument("--quick", action="store_true", help="fewer steps, rounds and micro-batch counts")
    parser.add_argument("--only", choices=("memory", "bubble", "throughput"), action="append",
                        help="run only these parts (repeatable); default all")
    args = parser.parse_args()
    parts = set(args.only or ("memory", "bubble", "throughput"))
    steps, rounds = (4, 5) if args.quick else (10, 9)
    bubble_steps = 3 if args.quick else 5
    micro_counts = [2, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    lines = []

    if "memory" in parts:
        mem = spawn_ranks(_memory_rank, 4, timeout_s=600)
        for stage, peaks in enumerate(mem):
            print(f"stage {stage}: peak activation MiB  gpipe {peaks['gpipe'] / 2**20:.2f}  1f1b "
                  f"{peaks['1f1b'] / 2**20:.2f}  1f1b+recompute {peaks['1f1b-recompute'] / 2**20:.2f}")
        lines.append({"benchmark": "pipeline", "metric": "peak_activation_bytes_stage0_p4_m8",
                      "plait": mem[0]["1f1b"], "reference": mem[0]["gpipe"],
                      "ratio": mem[0]["1f1b"] / mem[0]["gpipe"],
                      "goal": "1F1B below GPipe (theory 4/8 of the micro-batch activations on stage 0)"})

    if "bubble" in parts:
        res = spawn_ranks(_bubble_rank, 2, bubble_steps, micro_counts, timeout_s=1800)[0]
        print(f"bubble runs: {BUBBLE_ROWS} rows per micro-batch (MLP), timed stages sleep "
              f"{TIMED_FWD * 1e3:.0f}/{TIMED_BWD * 1e3:.0f} ms per forward/backward; median of {bubble_steps} steps")
        for label in ("mlp", "timed"):
            for key, r in res[label].items():
                micro = int(key.split("-m")[1])
                theory = bubble_theory(2, micro)
                busy = r["stage_busy_s"]
                # the same pipeline with the stage times actually measured (t_s = busy_s / m): makespan
                # sum(t) + (m-1) max(t); equals (p-1)/(m+p-1) when the stages are equal
                t = [b / micro for b in busy]
                uneven = 1.0 - micro * sum(t) / (len(t) * (sum(t) + (micro - 1) * max(t)))
                print(f"bubble {label:5s} {key:10s} measured {r['bubble']:.3f}  theory {theory:.3f}  "
                      f"relative error {(r['bubble'] - theory) / theory:+.1%}  (theory at measured stage times "
                      f"{uneven:.3f})  stage busy "
                      f"{' / '.join(f'{b * 1e3:.0f}' for b in busy)} ms (max/min {max(busy) / min(busy):.3f})  "
                      f"latency per dependent action {r['latency_s'] * 1e3:.2f} ms")
                lines.append({"benchmark": "pipeline", "metric": f"bubble_fraction_{label}_{key}_p2",
                              "plait": r["bubble"], "reference": theory, "ratio": r["bubble"] / theory,
                              "goal": "within 10% of (p-1)/(m+p-1)"})

    if "throughput" in parts:
        res = spawn_ranks(_bench_rank, 2, steps, rounds, timeout_s=1800)[0]
        print(f"split {res['bounds']}; max |param diff| after one step, Plait vs torch: {res['max_param_diff']}")
        for key, sec in res["step_seconds"].items():
            print(f"{key:12s} {sec * 1e3:8.1f} ms/step  {BATCH / sec:8.0f} examples/s (median of {rounds} rounds)")
        sec = res["step_seconds"]
        for name in ("gpipe", "1f1b"):
            ratios = res["ratios"][name]
            print(f"{name}: per-round ratios torch/Plait time " + " ".join(f"{r:.3f}" for r in ratios))
            lines.append({"benchmark": "pipeline", "metric": f"throughput_{name}_examples_per_s",
                          "plait": BATCH / sec[f"plait-{name}"], "reference": BATCH / sec[f"torch-{name}"],
                          "ratio": statistics.median(ratios), "goal": ">= 1.0"})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
