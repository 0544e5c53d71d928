"""Pipelines on spawned gloo ranks against a single process: same parameters after training, same inference.

One spawn of 4 ranks runs every case in turn (spawning costs ~1.5 s): 2, 3 and 4 stages, GPipe and 1F1B, several
micro-batch counts (fewer than, equal to and more than the stages, uneven sizes), recomputation, model parallelism
(one micro-batch), data × pipeline (2 replicas × 2 stages), and pipelined inference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
# name: (stages, replicas, micro_batches, schedule, boundaries into the 12 layers, recompute)
CASES = {
    "model_parallel_p2": (2, 1, 1, "gpipe", [5], False),
    "p2_1f1b_m4": (2, 1, 4, "1f1b", [3], False),
    "p3_gpipe_m5": (3, 1, 5, "gpipe", [3, 7], False),    # uneven micro-batches 3,3,2,2,2
    "p3_1f1b_m2_recompute": (3, 1, 2, "1f1b", [3, 7], True),  # m < p
    "p4_1f1b_m6": (4, 1, 6, "1f1b", [2, 5, 8], False),
    "p4_gpipe_m6": (4, 1, 6, "gpipe", [2, 5, 8], False),
    "p4_gpipe_m3_recompute": (4, 1, 3, "gpipe", [2, 5, 8], True),
    "r2p2_1f1b_m2": (2, 2, 2, "1f1b", [5], False),
    "r2p2_gpipe_m3": (2, 2, 3, "gpipe", [5], False),
}


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, IN_FEATURES, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(7)
    return deep_mlp(depth=DEPTH, hidden=HIDDEN, in_features=IN_FEATURES)


def _run_case(rank: int, world_size: int, case: tuple) -> dict | None:
    stages, replicas, micro, schedule_name, bounds, recompute = case
    layout = PipelineLayout(replicas=replicas, stages=stages)
    groups = ReplicaGroups(layout, rank) if rank < layout.world_size or replicas > 1 else None
    if rank >= layout.world_size:
        return None  # this case uses fewer ranks
    replica, stage_index = layout.coords(rank)
    placement = layout.placement(rank)
    module = split_layers(_model(), bounds)[stage_index]
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)
    stage = PipelineStage(module, placement, loss_fn=F.cross_entropy if placement.is_last else None,
                          recompute=recompute)
    schedule = build_schedule(schedule_name, stages, micro)
    per = BATCH // replicas
    peaks, records = [], []
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[replica * per:(replica + 1) * per], y[replica * per:(replica + 1) * per]
        optimizer.zero_grad(set_to_none=True)
        stage.meter.reset_peak()
        record = stage.train_step(schedule, per, x if placement.is_first else None, y if placement.is_last else None)
        groups.allreduce_grads(module).wait()
        optimizer.step()
        peaks.append(stage.meter.peak_bytes)
        records.append(record)
    return {"stage": stage_index, "replica": replica,
            "params": {k: v.numpy().copy() for k, v in module.state_dict().items()},
            "peak_bytes": max(peaks), "live_after": stage.meter.live_bytes,
            "actions": [(kind, k) for kind, k, _, _ in records[-1].intervals],
            "loss": None if records[-1].loss is None else float(records[-1].loss)}


def _all_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, case in CASES.items():
        out[name] = _run_case(rank, world_size, case)
        dist.barrier()
    # inference: 4 stages, 3 micro-batches of 10 rows (4, 3, 3)
    layout = PipelineLayout(replicas=1, stages=4)
    stage = PipelineStage(split_layers(_model(), [2, 5, 8])[rank], layout.placement(rank), loss_fn=F.cross_entropy)
    x, _ = _data(99)
    logits = pipelined_forward(stage, 10, 3, x[:10] if rank == 0 else None)
    out["inference"] = None if logits is None else logits.numpy()  # numpy: tensors would travel as shared memory
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
    for name, (stages, replicas, micro, schedule_name, bounds, _) in CASES.items():
        expected, losses = _reference(bounds)
        ranks = [r[name] for r in results if r[name] is not None]
        assert len(ranks) == stages * replicas, name
        for got in ranks:
            want = expected[got["stage"]]
            assert got["params"].keys() == want.keys()
            for key in want:
                _assert_param_close(torch.from_numpy(got["params"][key]), want[key],
                                    f"{name}, stage {got['stage']}, {key}")
            assert got["live_after"] == 0, name  # every saved activation was freed by its backward
            assert got["actions"] == [(a.kind, a.micro_batch)
                                      for a in build_schedule(schedule_name, stages, micro).actions[got["stage"]]]
            if got["stage"] == stages - 1 and replicas == 1:
                # the last stage's batch loss before the final update equals the single process's
                assert abs(got["loss"] - losses[-1]) < 1e-5, name
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
