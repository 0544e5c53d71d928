"""Pipelines on spawned gloo ranks against a single process: same parameters after training, same inference.

One spawn of 4 ranks runs every case in turn (spawning costs ~1.5 s): 2, 3 and 4 stages, GPipe and 1F1B, several
micro-batch counts (fewer than, equal to and more than the stages, uneven sizes), recomputation, model parallelism
(one micro-batch), data × pipeline (2 replicas × 2 stages); interleaved 1F1B with 2 ranks × 2 chunks, 2 × 3 (with
recomputation), 4 × 2 and 2 replicas of 2 × 2; zero bubble (B and W apart) on 2, 3 (m < p, recomputation) and 4
stages (uneven micro-batches), and 2 replicas × 2 stages; pipelined inference through 4 stages and through 2 ranks
× 2 chunks.
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
from plait.parallel.pipeline.config import PipelineRunConfig
from plait.parallel.pipeline.model import deep_mlp
from plait.parallel.pipeline_train import choose_boundaries
from plait.settings.config import from_dict

IN_FEATURES, HIDDEN, DEPTH, BATCH, STEPS, LR, MOMENTUM = 20, 16, 6, 12, 3, 0.1, 0.9
# name: (stages, chunks per rank, replicas, micro_batches, schedule, boundaries into the 12 layers, recompute)
CASES = {
    "model_parallel_p2": (2, 1, 1, 1, "gpipe", [5], False),
    "p2_1f1b_m4": (2, 1, 1, 4, "1f1b", [3], False),
    "p3_gpipe_m5": (3, 1, 1, 5, "gpipe", [3, 7], False),    # uneven micro-batches 3,3,2,2,2
    "p3_1f1b_m2_recompute": (3, 1, 1, 2, "1f1b", [3, 7], True),  # m < p
    "p4_1f1b_m6": (4, 1, 1, 6, "1f1b", [2, 5, 8], False),
    "p4_gpipe_m6": (4, 1, 1, 6, "gpipe", [2, 5, 8], False),
    "p4_gpipe_m3_recompute": (4, 1, 1, 3, "gpipe", [2, 5, 8], True),
    "r2p2_1f1b_m2": (2, 1, 2, 2, "1f1b", [5], False),
    "r2p2_gpipe_m3": (2, 1, 2, 3, "gpipe", [5], False),
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
    stage = PipelineStage(list(mine.values()) if chunks > 1 else mine[stage_index], placement,
                          loss_fn=F.cross_entropy if placement.is_last else None, recompute=recompute)
    optimizer = torch.optim.SGD(stage.module.parameters(), lr=LR, momentum=MOMENTUM)
    schedule = build_schedule(schedule_name, stages, micro, chunks)
    per = BATCH // replicas
    peaks, records = [], []
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[replica * per:(replica + 1) * per], y[replica * per:(replica + 1) * per]
        optimizer.zero_grad(set_to_none=True)
        stage.meter.reset_peak()
        record = stage.train_step(schedule, per, x if placement.is_first else None, y if placement.is_last else None)
        groups.allreduce_grads(stage.module).wait()
        optimizer.step()
        peaks.append(stage.meter.peak_bytes)
        records.append(record)
    return {"stage": stage_index, "replica": replica,
            "params": {v: {k: t.numpy().copy() for k, t in m.state_dict().items()} for v, m in mine.items()},
            "peak_bytes": max(peaks), "live_after": stage.meter.live_bytes,
            "actions": [(kind, k) for kind, k, _, _ in records[-1].intervals],
            "loss": None if records[-1].loss is None else float(records[-1].loss)}


def _all_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, case in CASES.items():
        out[name] = _run_case(rank, case)
        dist.barrier()
    # inference: 4 stages, 3 micro-batches of 10 rows (4, 3, 3)
    layout = PipelineLayout(replicas=1, stages=4)
    stage = PipelineStage(split_layers(_model(), [2, 5, 8])[rank], layout.placement(rank), loss_fn=F.cross_entropy)
    x, _ = _data(99)
    logits = pipelined_forward(stage, 10, 3, x[:10] if rank == 0 else None)
    out["inference"] = None if logits is None else logits.numpy()  # numpy: tensors would travel as shared memory
    if rank < 2:  # inference through 2 ranks × 2 chunks
        pieces = split_layers(_model(), [3, 5, 8])
        chunked = PipelineStage(nn.ModuleList([pieces[rank], pieces[rank + 2]]),
                                PipelineLayout(replicas=1, stages=2).placement(rank), loss_fn=F.cross_entropy)
        logits = pipelined_forward(chunked, 10, 3, x[:10] if rank == 0 else None)
        out["chunked_inference"] = None if logits is None else logits.numpy()
    # partition by measured time: rank 0 profiles, every rank must end up with its split
    config = from_dict(PipelineRunConfig, {"parallel": {"stages": 4, "partition": "time"}})
    out["time_split"] = choose_boundaries(config, _model(), x[:4], torch.device("cpu"))
    return out


def _reference(boundaries: list[int]) -> tuple[list[dict], list[float]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return [s.state_dict() for s in split_layers(model, boundaries)], losses


def _assert_param_close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")


def test_pipelines_match_single_process_training_and_inference():
    results = spawn_ranks(_all_cases, 4, timeout_s=240)
    for name, (stages, chunks, replicas, micro, schedule_name, bounds, _) in CASES.items():
        expected, losses = _reference(bounds)
        ranks = [r[name] for r in results if r[name] is not None]
        assert len(ranks) == stages * replicas, name
        schedule = build_schedule(schedule_name, stages, micro, chunks)
        for got in ranks:
            assert sorted(got["params"]) == list(range(got["stage"], stages * chunks, stages)), name
            for virtual, params in got["params"].items():
                want = expected[virtual]
                assert params.keys() == want.keys()
                for key in want:
                    _assert_param_close(torch.from_numpy(params[key]), want[key],
                                        f"{name}, virtual stage {virtual}, {key}")
            assert got["live_after"] == 0, name  # every saved activation was freed by its backward (or its W)
            assert got["actions"] == [(a.kind, a.micro_batch) for a in schedule.actions[got["stage"]]], name
            if got["stage"] == stages - 1 and replicas == 1:
                # the last stage's batch loss before the final update equals the single process's
                assert abs(got["loss"] - losses[-1]) < 1e-5, name
        if schedule_name == "zero_bubble":
            assert any(kind == "W" for kind, _ in ranks[0]["actions"]), name
    # 1F1B holds at most p - s micro-batches on stage 0, GPipe all m: stage 0 of the m=6, p=4 runs (Flatten, Linear)
    # keeps one [2, 16] float output per micro-batch in flight (128 bytes); its input batch is data, not counted
    stage0 = {name: next(r[name] for r in results if r[name] and r[name]["stage"] == 0)["peak_bytes"]
              for name in ("p4_gpipe_m6", "p4_1f1b_m6")}
    assert stage0 == {"p4_gpipe_m6": 6 * 128, "p4_1f1b_m6": 4 * 128}
    splits = [r["time_split"] for r in results]
    assert all(split == splits[0] for split in splits) and len(splits[0]) == 3
    assert splits[0] == sorted(set(splits[0])) and 0 < splits[0][0] and splits[0][-1] < 12
    # inference equals the single-process forward
    model = _model()
    with torch.no_grad():
        want = model(_data(99)[0][:10])
    assert results[0]["inference"] is None
    torch.testing.assert_close(torch.from_numpy(results[3]["inference"]), want, atol=1e-6, rtol=0)
    assert results[0]["chunked_inference"] is None
    torch.testing.assert_close(torch.from_numpy(results[1]["chunked_inference"]), want, atol=1e-6, rtol=0)
