"""Interleaved 1F1B and zero bubble on spawned gloo ranks against a single process: same parameters after training.

One spawn of 4 ranks runs every case in turn: interleaved with 2 ranks × 2 chunks, 2 × 3 (with recomputation), 4 × 2,
and 2 replicas of 2 × 2; zero bubble (B and W apart) on 2, 3 (m < p, recomputation) and 4 stages (uneven
micro-batches), and 2 replicas × 2 stages; then pipelined inference through 2 ranks × 2 chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.parallel.launch import spawn_ranks
from plait.parallel.pipeline import (
    PipelineLayout,
    PipelineStage,
    ReplicaGroups,
    build_schedule,
    pipelined_forward,
    split_layers,
)
from plait.parallel.pipeline.model import deep_mlp

IN_FEATURES, HIDDEN, DEPTH, BATCH, STEPS, LR, MOMENTUM = 20, 16, 6, 12, 2, 0.1, 0.9
# name: (stages, chunks per rank, replicas, micro_batches, schedule, boundaries into the 12 layers, recompute)
CASES = {
    "interleaved_p2v2_m4": (2, 2, 1, 4, "interleaved_1f1b", [3, 5, 8], False),
    "interleaved_p2v3_m2_recompute": (2, 3, 1, 2, "interleaved_1f1b", [2, 4, 6, 8, 10], True),
    "interleaved_p4v2_m4": (4, 2, 1, 4, "interleaved_1f1b", [2, 4, 6, 7, 8, 10, 11], False),  # two ReLU-only chunks
    "interleaved_r2p2v2_m2": (2, 2, 2, 2, "interleaved_1f1b", [3, 5, 8], False),
    "zero_bubble_p2_m4": (2, 1, 1, 4, "zero_bubble", [5], False),
    "zero_bubble_p3_m2_recompute": (3, 1, 1, 2, "zero_bubble", [3, 7], True),  # m < p
    "zero_bubble_p4_m5": (4, 1, 1, 5, "zero_bubble", [2, 5, 8], False),      # uneven micro-batches 3,3,2,2,2
    "zero_bubble_r2p2_m3": (2, 1, 2, 3, "zero_bubble", [5], False),
}


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, IN_FEATURES, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(7)
    return deep_mlp(depth=DEPTH, hidden=HIDDEN, in_features=IN_FEATURES)


def _run_case(rank: int, case: tuple) -> dict | None:
    stages, chunks, replicas, micro, schedule_name, bounds, recompute = case
    layout = PipelineLayout(replicas=replicas, stages=stages)
    groups = ReplicaGroups(layout, rank) if rank < layout.world_size or replicas > 1 else None
    if rank >= layout.world_size:
        return None  # this case uses fewer ranks
    replica, stage_index = layout.coords(rank)
    placement = layout.placement(rank)
    pieces = split_layers(_model(), bounds)
    mine = {virtual: pieces[virtual] for virtual in range(stage_index, stages * chunks, stages)}
    stage = PipelineStage(list(mine.values()), placement, loss_fn=F.cross_entropy if placement.is_last else None,
                          recompute=recompute)
    optimizer = torch.optim.SGD(stage.module.parameters(), lr=LR, momentum=MOMENTUM)
    schedule = build_schedule(schedule_name, stages, micro, chunks)
    per = BATCH // replicas
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[replica * per:(replica + 1) * per], y[replica * per:(replica + 1) * per]
        optimizer.zero_grad(set_to_none=True)
        record = stage.train_step(schedule, per, x if placement.is_first else None, y if placement.is_last else None)
        groups.allreduce_grads(stage.module).wait()
        optimizer.step()
    return {"stage": stage_index,
            "params": {v: {k: t.numpy().copy() for k, t in m.state_dict().items()} for v, m in mine.items()},
            "live_after": stage.meter.live_bytes,
            "actions": [(kind, k) for kind, k, _, _ in record.intervals],
            "loss": None if record.loss is None else float(record.loss)}


def _all_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, case in CASES.items():
        out[name] = _run_case(rank, case)
        dist.barrier()
    # inference through 2 ranks × 2 chunks: 3 micro-batches of 10 rows (4, 3, 3)
    if rank < 2:
        layout = PipelineLayout(replicas=1, stages=2)
        pieces = split_layers(_model(), [3, 5, 8])
        stage = PipelineStage(nn.ModuleList([pieces[rank], pieces[rank + 2]]), layout.placement(rank),
                              loss_fn=F.cross_entropy)
        x, _ = _data(99)
        logits = pipelined_forward(stage, 10, 3, x[:10] if rank == 0 else None)
        out["inference"] = None if logits is None else logits.numpy()
    return out


def _reference(boundaries: list[int]) -> tuple[list[dict], float]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        x, y = _data(step)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return [s.state_dict() for s in split_layers(model, boundaries)], loss.item()


def test_interleaved_and_zero_bubble_match_single_process_training():
    results = spawn_ranks(_all_cases, 4, timeout_s=240)
    for name, (stages, chunks, replicas, micro, schedule_name, bounds, _) in CASES.items():
        expected, last_loss = _reference(bounds)
        ranks = [r[name] for r in results if r[name] is not None]
        assert len(ranks) == stages * replicas, name
        schedule = build_schedule(schedule_name, stages, micro, chunks)
        for got in ranks:
            assert sorted(got["params"]) == list(range(got["stage"], stages * chunks, stages)), name
            for virtual, params in got["params"].items():
                want = expected[virtual]
                assert params.keys() == want.keys()
                for key in want:
                    where = f"{name}, virtual stage {virtual}, {key}"
                    torch.testing.assert_close(torch.from_numpy(params[key]), want[key], atol=1e-5, rtol=0,
                                               msg=lambda m, where=where: f"{where}: {m}")
            assert got["live_after"] == 0, name  # every saved activation was freed by its backward (or its W)
            assert got["actions"] == [(a.kind, a.micro_batch) for a in schedule.actions[got["stage"]]], name
            if got["stage"] == stages - 1 and replicas == 1:
                assert abs(got["loss"] - last_loss) < 1e-5, name  # the batch loss before the last update
        if schedule_name == "zero_bubble":
            assert any(kind == "W" for kind, _ in ranks[0]["actions"]), name
    model = _model()
    with torch.no_grad():
        want = model(_data(99)[0][:10])
    assert results[0]["inference"] is None
    torch.testing.assert_close(torch.from_numpy(results[1]["inference"]), want, atol=1e-6, rtol=0)
