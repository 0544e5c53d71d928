"""Model and pipeline parallelism: partition a sequential model into stages, run GPipe, 1F1B, interleaved 1F1B or
zero-bubble schedules over micro-batches with point-to-point activations and gradients, replicate the pipeline
(data × pipeline), serve it.

    schedule.py   actions (stage, F/B/W, micro-batch) per stage; gpipe, 1f1b, interleaved 1f1b, zero bubble,
                  forward-only; dry run (deadlocks, bubble)
    partition.py  boundaries: explicit, balanced by parameter count, balanced by profiled time
    meta_init.py  build on the meta device, materialise only a stage's layers with seeded per-layer init
    stage.py      one stage on one rank: executes its row of a schedule; optional activation recomputation
    split_backward.py  a backward split into B (input gradient) and W (weight gradients) for zero bubble
    comm.py       p2p transfers and the shape headers agreed before the first step
    groups.py     r × p layout and the per-stage replica groups (gradient all-reduce)
    inference.py  forward-only pipelined inference
    memory.py     bytes of activations held per stage
    checkpoints.py  each rank's stage checkpoints in its own run directory; resuming a restarted group
"""

from plait.parallel.pipeline.groups import PipelineLayout, ReplicaGroups
from plait.parallel.pipeline.inference import pipelined_forward, pipelined_predict
from plait.parallel.pipeline.memory import ActivationMeter
from plait.parallel.pipeline.meta_init import build_on_meta, materialise
from plait.parallel.pipeline.partition import (
                                               balance,
                                               balance_by_params,
                                               balance_by_time,
                                               check_boundaries,
                                               split_layers,
)
from plait.parallel.pipeline.schedule import (
                                               Action,
                                               DeadlockError,
                                               DryRun,
                                               Schedule,
                                               ScheduleError,
                                               bubble_theory,
                                               build_schedule,
                                               dry_run,
                                               forward_only,
                                               gpipe,
                                               interleaved_one_f_one_b,
                                               one_f_one_b,
                                               zero_bubble,
)
from plait.parallel.pipeline.stage import PipelineStage, Placement, StepRecord, micro_batch_sizes

__all__ = [
    "Action", "ActivationMeter", "DeadlockError", "DryRun", "PipelineLayout", "PipelineStage", "Placement",
    "ReplicaGroups", "Schedule", "ScheduleError", "StepRecord", "balance", "balance_by_params", "balance_by_time",
    "bubble_theory", "build_on_meta", "build_schedule", "check_boundaries", "dry_run", "forward_only", "gpipe",
    "interleaved_one_f_one_b", "materialise", "micro_batch_sizes", "one_f_one_b", "pipelined_forward",
    "pipelined_predict", "split_layers", "zero_bubble",
]
