"""Pipeline bubble of every schedule, measured against its dry run and its formula: GPipe, 1F1B, interleaved 1F1B
(2 chunks per rank) and zero bubble (ZB-H1), p = 4 ranks on gloo, m = 4, 8, 16 micro-batches.

    .venv/bin/python benchmarks/pipeline_bubble.py [--quick]

1. Bubble. The stages are timed: they sleep, so four ranks on a small machine do not fight over cores, and they are
   exactly equal, as the formulas assume. Per stage and micro-batch: forward F, input gradient B and weight gradient
   W of STAGE_MS each (the equal costs of Qi et al.); a whole backward is B + W; an interleaved chunk takes 1/v of
   each. B and W are separate autograd nodes of the timed layer, so zero bubble's B sleeps only B and its W only W.
   Measured as `pipeline_train` measures it: per step 1 - (sum of every rank's busy time) / (p x (last end - first
   start)); a run is the median of its steps, and every figure is the median of RUNS runs (min-max across them),
   the runs interleaved over all configurations so that load drifting on a shared machine hits all of them. Beside
   it: the dry run's bubble with the same costs and free communication, and the formula (`bubble_theory`, the
   JSON's reference). Step time: measured, against the dry run's makespan.
2. What the B/W split costs on real layers (one process): one stage of a deep MLP, forward, whole backward, and B
   and W apart (`split_backward.SplitBackward`), median of repeats. B + W against the whole backward says whether
   the split adds work; F:B:W says how far a real stage is from the equal costs above (and the zero-bubble formula
   at those measured costs).

The dry run's bubbles are exact; measured ones carry every hand-off's latency (message, wake-up, Python: about a
millisecond on a loaded 2-core machine, against STAGE_MS of work per action), so they sit above the dry run, most
for the schedules with many short actions (interleaved) and many micro-batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline import PipelineLayout, PipelineStage, bubble_theory, build_schedule, dry_run
from plait.parallel.pipeline.model import deep_mlp
from plait.parallel.pipeline.split_backward import SplitBackward

STAGES, STAGE_MS, ROWS, WIDTH = 4, 25.0, 8, 16   # ranks; F = B = W per stage and micro-batch; rows per micro-batch
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1))  # (name, chunks per rank)
MICRO_COUNTS = (4, 8, 16)
RUNS = 3


class _Sleep(torch.autograd.Function):
    """Identity that sleeps `forward_s` in the forward and `backward_s` in the backward."""

    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float):
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class _Timed(nn.Module):
    """out = x + weight, where the path from x sleeps F forward and B backward and the path from the weight sleeps W
    backward: a backward asked only for the input gradient (B) runs the first, one asked only for the weight's (W)
    the second, a whole backward both."""

    def __init__(self, seconds: tuple[float, float, float]):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        f, b, w = self.seconds
        return _Sleep.apply(x, f, b) + _Sleep.apply(self.weight, 0.0, w)


class _Scale(nn.Module):
    """A parameter before the timed layer: the first stage's input needs no gradient, its timed layer's does."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


class _Head(nn.Module):
    def forward(self, x):
        return x[:, :10]


def _timed_chunk(chunks: int, head: bool) -> nn.Sequential:
    seconds = (STAGE_MS / 1e3 / chunks,) * 3
    return nn.Sequential(_Scale(), _Timed(seconds), *([_Head()] if head else []))


def _step_bubble(stage: PipelineStage, schedule, x, y, world_size: int) -> tuple[float, float]:
    """One training step; (bubble, wall seconds) over all ranks, as pipeline_train measures them."""
    where = stage.placement
    stage.module.zero_grad(set_to_none=True)
    dist.barrier()
    record = stage.train_step(schedule, len(x), x if where.is_first else None, y if where.is_last else None)
    span = torch.tensor([record.end, -record.start, record.busy], dtype=torch.float64)
    dist.all_reduce(span[:2], op=dist.ReduceOp.MAX)
    dist.all_reduce(span[2:], op=dist.ReduceOp.SUM)
    wall = float(span[0] + span[1])
    return 1.0 - float(span[2]) / (world_size * wall), wall


def _bubble_rank(rank: int, world_size: int, steps: int, runs: int) -> dict:
    placement = PipelineLayout(replicas=1, stages=world_size).placement(rank)
    configs = {}
    for name, chunks in SCHEDULES:
        for micro in MICRO_COUNTS:
            modules = [_timed_chunk(chunks, head=placement.is_last and c == chunks - 1) for c in range(chunks)]
            stage = PipelineStage(modules if chunks > 1 else modules[0], placement,
                                  loss_fn=F.cross_entropy if placement.is_last else None)
            gen = torch.Generator().manual_seed(micro)
            x = torch.randn(micro * ROWS, WIDTH, generator=gen)
            y = torch.randint(0, 10, (micro * ROWS,), generator=gen)
            configs[(name, micro)] = (stage, build_schedule(name, world_size, micro, chunks), x, y)
    results: dict[str, dict[str, list[float]]] = {f"{n}-m{m}": {"bubble": [], "seconds": []} for n, m in configs}
    for run in range(runs):  # runs outermost: a load spike hits one run of every configuration, not one config
        for (name, micro), (stage, schedule, x, y) in configs.items():
            if run == 0:
                _step_bubble(stage, schedule, x, y, world_size)  # warm-up: shapes agreed, buffers allocated
            measured = [_step_bubble(stage, schedule, x, y, world_size) for _ in range(steps)]
            results[f"{name}-m{micro}"]["bubble"].append(statistics.median(b for b, _ in measured))
            results[f"{name}-m{micro}"]["seconds"].append(statistics.median(s for _, s in measured))
    return results


def _split_cost(repeats: int) -> dict[str, float]:
    """One stage of a deep MLP (4 Linear(1024, 1024) + ReLU, 256 rows), one thread: median seconds of F, the whole
    backward, and B and W apart."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage = deep_mlp(depth=9, hidden=1024, in_features=1024)[3:11]  # Linear, ReLU, ... : 4 blocks
    x = torch.randn(256, 1024)
    grad = torch.randn(256, 1024)
    times: dict[str, list[float]] = {"F": [], "whole": [], "B": [], "W": []}
    for rep in range(repeats + 2):
        xin = x.clone().requires_grad_()
        t0 = time.perf_counter()
        out = stage(xin)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        graph = SplitBackward(stage, x.clone().requires_grad_())
        t3 = time.perf_counter()
        graph.backward_input(grad)
        t4 = time.perf_counter()
        graph.backward_weight()
        t5 = time.perf_counter()
        stage.zero_grad(set_to_none=True)
        if rep >= 2:  # two warm-ups
            for key, value in (("F", t1 - t0), ("whole", t2 - t1), ("B", t4 - t3), ("W", t5 - t4)):
                times[key].append(value)
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps per run instead of 5, fewer split repeats")
    args = parser.parse_args()
    steps, repeats = (2, 5) if args.quick else (5, 15)
    lines = []

    started = time.time()
    res = spawn_ranks(_bubble_rank, STAGES, steps, RUNS, timeout_s=3600)[0]
    print(f"bubble, p = {STAGES} timed stages (F = B = W = {STAGE_MS:.0f} ms per stage and micro-batch), "
          f"median of {RUNS} runs of {steps} steps (min-max over runs); {time.time() - started:.0f} s")
    print(f"{'schedule':18s} {'m':>3s} {'theory':>7s} {'dry run':>8s} {'measured':>22s} {'vs theory':>9s} "
          f"{'step ms':>22s} {'dry run ms':>10s}")
    for name, chunks in SCHEDULES:
        for micro in MICRO_COUNTS:
            seconds = STAGE_MS / 1e3 / chunks
            plan = dry_run(build_schedule(name, STAGES, micro, chunks), forward_cost=seconds,
                           backward_cost=2 * seconds, weight_cost=seconds)
            theory = bubble_theory(STAGES, micro, schedule=name, chunks_per_rank=chunks)
            r = res[f"{name}-m{micro}"]
            bubble, wall = statistics.median(r["bubble"]), statistics.median(r["seconds"])
            print(f"{name:18s} {micro:3d} {theory:7.3f} {plan.bubble:8.3f} {bubble:7.3f} "
                  f"({min(r['bubble']):.3f}-{max(r['bubble']):.3f}) {(bubble - theory) / theory:+9.1%} "
                  f"{wall * 1e3:7.0f} ({min(r['seconds']) * 1e3:.0f}-{max(r['seconds']) * 1e3:.0f}) "
                  f"{plan.makespan * 1e3:10.0f}")
            lines.append({"benchmark": "pipeline_bubble", "metric": f"bubble_{name}_p{STAGES}_m{micro}",
                          "plait": round(bubble, 4), "reference": round(theory, 4), "ratio": round(bubble / theory, 3),
                          "goal": "within 10% of theory (timed stages)", "dry_run": round(plan.bubble, 4),
                          "min": round(min(r["bubble"]), 4), "max": round(max(r["bubble"]), 4)})
            lines.append({"benchmark": "pipeline_bubble", "metric": f"step_seconds_{name}_p{STAGES}_m{micro}",
                          "plait": round(wall, 4), "reference": round(plan.makespan, 4),
                          "ratio": round(wall / plan.makespan, 3), "goal": "(shown: against the dry run's makespan)",
                          "min": round(min(r["seconds"]), 4), "max": round(max(r["seconds"]), 4)})

    cost = _split_cost(repeats)
    f, b, w = cost["F"], cost["B"], cost["W"]
    at_costs = {m: bubble_theory(STAGES, m, schedule="zero_bubble", forward_cost=f, backward_cost=b + w,
                                 weight_cost=w) for m in MICRO_COUNTS}
    print(f"B/W split, one MLP stage (4 x Linear(1024, 1024)+ReLU, 256 rows, 1 thread), median of {repeats}: "
          f"F {f * 1e3:.1f} ms, whole backward {cost['whole'] * 1e3:.1f} ms, B {b * 1e3:.1f} + W {w * 1e3:.1f} = "
          f"{(b + w) * 1e3:.1f} ms ({(b + w) / cost['whole']:.2f}x the whole backward); F:B:W = 1 : {b / f:.2f} : "
          f"{w / f:.2f}; zero-bubble theory at these costs, p = {STAGES}: "
          + ", ".join(f"m={m} {v:.3f}" for m, v in at_costs.items()))
    lines.append({"benchmark": "pipeline_bubble", "metric": "split_backward_B_plus_W_seconds_mlp_stage",
                  "plait": round(b + w, 5), "reference": round(cost["whole"], 5),
                  "ratio": round((b + w) / cost["whole"], 3), "goal": "<= 1.1 (the split adds no work)"})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
