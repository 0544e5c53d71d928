"""Data-parallel training of one rank: the loop, its records and its checkpoints, in the run the driver hands it.

The driver (`plait.experiment.runs.data_parallel`: `plait train CONFIG.toml --nproc N`, or the same under torchrun)
prepares the run directory and gives every rank a `RunContext`: rank 0's writes the records and the checkpoint, the
others' write nothing. Every rank builds its trainer from the config's sections, trains on its shard of each step's
batch, and takes part in the collectives that log a record (one small all-gather) and gather a checkpoint (error
feedback residuals and hook states are each rank's own). On resume rank 0 reads the checkpoint and broadcasts it, so
other nodes need no copy of the run directory.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from plait.parallel.components import RunData, build_image_model, check_user_code, load_run_data, normalized_images
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.data_parallel import DataParallel
from plait.parallel.device import rank_device, use_device
from plait.parallel.dims import ParallelDims
from plait.parallel.divergence import DivergenceGuard
from plait.parallel.optim import current_lr, state_matches
from plait.parallel.sampler import ShardedSampler
from plait.parallel.sharded import ShardedDataParallel
from plait.runtime.checkpoint import CHECKPOINT_FILE
from plait.runtime.context import RunContext
from plait.runtime.divergence import Diverged
from plait.user_model import task_loss

# Each rank's sums since the last record, all-gathered in one message: loss, bytes up, bytes down, and three times.
_WINDOW = ("train_loss", "bytes_up", "bytes_down", "compute_s", "comm_s", "step_s")
Trainer = DataParallel | ShardedDataParallel


def load_data(config: DataParallelRunConfig) -> RunData:
    return load_run_data(config.data, name=config.data.name, path=config.data.path, cache_dir=config.data.cache_dir,
                         prepare_images=normalized_images)


def check_config_code(config: DataParallelRunConfig) -> None:
    """At start, before the run directory: the user's model and data (when named) load, fit together and fit
    `train.task`'s loss. ValueError naming the setting otherwise; the presets need no check."""
    if not (config.model.factory or config.data.source):
        return
    with torch.random.fork_rng(devices=[]):  # the ranks draw the initial weights from the seed, untouched
        check_user_code(build_image_model(config.model), config.model, load_data(config), config.train.task)


def _batch(data: RunData, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor, device: torch.device):
    """Gather on the host, copy to the device (from pinned memory the copy is asynchronous: non_blocking), then
    prepare the inputs there (the built-in images are scaled per batch)."""
    x, y = x_all[idx], y_all[idx]
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return data.prepare(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def _straggler_delay(config: DataParallelRunConfig, rank: int, step: int, last_compute_s: float) -> float:
    cfg = config.stragglers
    if rank not in cfg.ranks or cfg.factor <= 1 or last_compute_s <= 0:
        return 0.0
    if cfg.probability < 1 and random.Random(f"{config.run.seed}:{rank}:{step}").random() >= cfg.probability:
        return 0.0
    return (cfg.factor - 1.0) * last_compute_s


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: RunData, device: torch.device, task: str) -> dict[str, float]:
    """test_loss (and test_accuracy for classification) on the test set, the model in eval mode; the sums stay on
    the device until the end."""
    assert data.sets.test is not None
    images, labels = data.sets.test.x, data.sets.test.y
    assert isinstance(images, torch.Tensor)
    loss_fn = task_loss(task)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(labels), 2000):
        idx = torch.arange(start, min(start + 2000, len(labels)))
        x, y = _batch(data, images, labels, idx, device)
        outputs = model(x).float()
        loss_sum += loss_fn(outputs, y).double() * len(idx)
        if task == "classification":
            correct += (outputs.argmax(1) == y).sum()
    model.train()
    result = {"test_loss": float(loss_sum) / len(labels)}
    if task == "classification":
        result["test_accuracy"] = int(correct) / len(labels)
    return result


def build_trainer(config: DataParallelRunConfig, model: torch.nn.Module, dims: ParallelDims, rank: int) -> Trainer:
    """The run's trainer, its components (all-reduce, compressor, hook, optimizer) built once from their sections."""
    train = config.train
    loss_fn = task_loss(train.task)
    if config.sync.kind == "sharded":
        return ShardedDataParallel(model, dims, optimizer=train.build_optimizer, precision=train.precision,
                                   loss_fn=loss_fn)
    return DataParallel(model, dims, kind=config.sync.kind, allreduce=config.parallel.build_allreduce(dims.grad_group),
                        local_steps=config.sync.local_steps, bucket_bytes=int(config.parallel.bucket_mb * 2**20),
                        overlap=config.parallel.overlap, optimizer=train.build_optimizer,
                        compressor=config.compression.build(seed=config.run.seed * 1000 + rank),
                        comm_hook=config.comm_hook.build(seed=config.run.seed), precision=train.precision,
                        shard_optimizer=config.sync.shard_optimizer, shard_gradients=config.sync.shard_gradients,
                        loss_fn=loss_fn)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict whole: a sharded model's parameters gathered (a collective: every rank calls it, in the
    same order); buffers as this rank holds them (rank 0's, like DDP's broadcast of them)."""
    return {name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in model.state_dict().items()}


def _checkpoint(run: RunContext, dp: Trainer, step: int, world_size: int, rank: int, final: bool) -> None:
    """Every rank takes part (error-feedback residuals and hook states are gathered, and a sharded model's
    parameters); rank 0's run writes the file."""
    residuals = None
    if dp.has_residuals:
        residual = dp.residual_flat()
        residuals = [torch.empty_like(residual) for _ in range(world_size)] if rank == 0 else None
        dist.gather(residual, residuals, dst=0)
    hook_states = None
    if dp.has_hook_state:  # PowerSGD's errors and Q, top-k's residuals: each rank's own
        hook_states = [None] * world_size if rank == 0 else None
        dist.gather_object(dp.hook_state(), hook_states, dst=0)
    params, optim = dp.full_params(), dp.optimizer_state()  # collective when sharded: every rank gathers
    if rank != 0:
        return
    state: dict[str, Any] = {"step": step, "params": params.detach().cpu().clone(), "world_size": world_size}
    if optim:
        state["optim"] = {key: value.cpu() for key, value in optim.items()}
        state["optimizer"] = dp.optimizer_name
    if residuals is not None:
        state["residuals"] = torch.stack(residuals).cpu()  # [world_size, numel]: rank r's row is its own
    if hook_states is not None:
        state["hook_states"] = hook_states  # one per rank, in rank order
        state["hook"] = type(dp.grad_sync.comm_hook).__name__
    run.save(step, lambda: state, final=final)


def _broadcast_tensors(tensors: dict[str, torch.Tensor], rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's named tensors on every rank: names, shapes and dtypes first (one small object), then the data."""
    layout = [[(name, tuple(t.shape), t.dtype) for name, t in tensors.items()] if rank == 0 else None]
    dist.broadcast_object_list(layout, src=0)
    out = {}
    for name, shape, dtype in layout[0]:
        tensor = tensors[name].to(device) if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        out[name] = tensor
    return out


def _resume(run: RunContext, dp: Trainer, rank: int, world_size: int) -> int:
    """Rank 0 reads the checkpoint and broadcasts it (other nodes need no copy of the run directory); each rank
    gets back its own error-feedback residuals and communication-hook state."""
    device = dp.device  # NCCL broadcasts device tensors only
    meta = torch.zeros(3, dtype=torch.int64, device=device)  # [step, residuals, hook states] (for this world)
    ckpt: dict[str, Any] = {}
    optim: dict[str, torch.Tensor] = {}
    if rank == 0:
        loaded = run.load()
        if loaded is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run.path}")
        ckpt = loaded
        if ckpt["params"].numel() != dp.num_params:
            raise ValueError(f"the checkpoint in {run.path} holds {ckpt['params'].numel()} parameters, the "
                             f"model has {dp.num_params}: the model changed (model.name, model.factory or "
                             "model.options); resume with the run's own settings (its config.toml), or start "
                             "another run.name")
        residuals = "residuals" in ckpt and dp.has_residuals
        if residuals and ckpt["world_size"] != world_size:
            print(f"note: the checkpoint's error-feedback residuals are for {ckpt['world_size']} ranks, this run has "
                  f"{world_size}: they start again from zero", flush=True)
            residuals = False
        hooks = "hook_states" in ckpt and dp.has_hook_state
        if hooks and (ckpt["world_size"] != world_size
                      or ckpt.get("hook") != type(dp.grad_sync.comm_hook).__name__):
            print("note: the checkpoint's communication-hook state is for another hook or world size: the hook "
                  "starts again from zero", flush=True)
            hooks = False
        meta[:] = torch.tensor([ckpt["step"], int(residuals), int(hooks)], device=device)
        params = ckpt["params"].to(device)
        # checkpoints from before Adam held SGD's momentum alone
        optim = ckpt.get("optim", {"momentum_buffer": ckpt["momentum"]} if "momentum" in ckpt else {})
        if optim and not state_matches(ckpt.get("optimizer", "sgd"), dp.optimizer_name, say=True):
            optim = {}
    dist.broadcast(meta, src=0)
    if rank != 0:
        params = torch.empty(dp.num_params, dtype=dp.params[0].dtype, device=device)
    dist.broadcast(params, src=0)
    dp.load_full_params(params)
    dp.load_optimizer_state(_broadcast_tensors(optim, rank, device))
    if meta[1]:
        mine = torch.empty_like(dp.flat_param)
        rows = list(ckpt["residuals"].to(mine.device).unbind()) if rank == 0 else None
        dist.scatter(mine, rows, src=0)
        dp.load_residual_flat(mine)
    if meta[2]:
        mine_state = [None]
        dist.scatter_object_list(mine_state, ckpt["hook_states"] if rank == 0 else None, src=0)
        dp.load_hook_state(mine_state[0])
    return int(meta[0])


def train_rank(rank: int, world_size: int, config: DataParallelRunConfig, run: RunContext) -> dict[str, Any] | None:
    """The training loop of one rank (spawned, or under torchrun). Rank 0 returns a summary."""
    started = time.perf_counter()
    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()  # cuda:LOCAL_RANK under NCCL, else the CPU; everything below is made there
    use_device(device)
    data = load_data(config)
    train_x, train_y = data.sets.train_x, data.sets.train.y
    train_cfg = config.train
    torch.manual_seed(config.run.seed)
    model = build_image_model(config.model).to(device)
    dp = build_trainer(config, model, dims, rank)
    dp.broadcast_params()
    start_step = _resume(run, dp, rank, world_size) if run.resume else 0
    started -= run.start(start_step)  # rank 0's log keeps the steps up to the checkpoint; elapsed_s goes on
    guard = DivergenceGuard(train_cfg.on_divergence, run.path / CHECKPOINT_FILE,
                            last_good=start_step if run.resume else None, device=device,
                            gradient_name="gradient" if config.sync.kind == "local_sgd" else "gradient after the sync")
    sampler = ShardedSampler(len(train_y), batch_size=train_cfg.batch_size,
                             accumulate=train_cfg.accumulate, rank=rank, world_size=world_size, seed=config.run.seed)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    window = torch.zeros(len(_WINDOW), dtype=torch.float64)  # host sums since the last record (times, bytes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # the loss stays on the device until logged
    loss_steps = 0  # steps in loss_sum: a skipped (diverged) step's loss is left out
    gathered = [torch.zeros(len(_WINDOW), dtype=torch.float64, device=device) for _ in range(world_size)]
    last_bytes = dp.bytes_moved()
    window_start, window_steps, last_compute = time.perf_counter(), 0, 0.0
    loss_value, test = float("nan"), None  # test: evaluate()'s metrics
    step = start_step
    try:
        for step in range(start_step + 1, train_cfg.steps + 1):
            idx = sampler.indices(step)
            batches = [_batch(data, train_x, train_y, part, device) for part in idx]
            delay = _straggler_delay(config, rank, step, last_compute)
            loss, times = dp.train_step(batches, step, delay_s=delay, guard=guard)
            last_compute = times.compute_s - delay
            if step in guard.skipped:  # every rank skipped this update (train.on_divergence = "skip")
                run.write({"step": step, "diverged": guard.skipped[step], "skipped": True})
            else:
                loss_sum += loss  # no host sync: float(loss) would wait for the device every step
                loss_steps += 1
            window[3:] += torch.tensor([times.compute_s, times.comm_s, times.total_s], dtype=torch.float64)
            window_steps += 1
            final = step == train_cfg.steps
            if final and config.sync.kind == "local_sgd" and step % config.sync.local_steps:
                guard.agree(step, dp.local_params())  # no diverged replica goes into the average
                dp.average_params()  # the run ends with one model, not world_size of them
            if step % train_cfg.log_every == 0 or final:
                sent, recv = dp.bytes_moved()
                window[1:3] = torch.tensor([sent - last_bytes[0], recv - last_bytes[1]], dtype=torch.float64)
                last_bytes = (sent, recv)
                mine = window.to(device) / window_steps
                mine[0] = loss_sum / loss_steps if loss_steps else float("nan")
                dist.all_gather(gathered, mine)  # one small message
                loss_sum.zero_()
                loss_steps = 0
                per_rank = torch.stack(gathered).cpu()
                elapsed = time.perf_counter() - window_start
                loss_value = float(per_rank[:, 0].mean())
                # FSDP2's forward all-gathers each layer's shards (a collective): every rank evaluates with it
                evaluates = rank == 0 or config.sync.kind == "sharded"
                if final and evaluates and train_cfg.eval_at_end and data.has_test:
                    test = evaluate(model, data, device, train_cfg.task)
                if run.writes:
                    record = {"step": step, "train_loss": loss_value,
                              "samples_per_s": window_steps * sampler.per_step / elapsed,
                              "bytes_up": int(per_rank[:, 1].sum()), "bytes_down": int(per_rank[:, 2].sum()),
                              "bytes_up_per_rank": [int(v) for v in per_rank[:, 1]],
                              "bytes_down_per_rank": [int(v) for v in per_rank[:, 2]],
                              "compute_s": [round(float(v), 6) for v in per_rank[:, 3]],
                              "comm_s": [round(float(v), 6) for v in per_rank[:, 4]],
                              "step_s": elapsed / window_steps, "restart": restarts,
                              "lr": current_lr(dp.optimizer) if dp.optimizer is not None else train_cfg.lr,
                              "elapsed_s": time.perf_counter() - started, "time": time.time()}
                    if loss_value != loss_value:  # NaN: every step of the window was skipped (on_divergence)
                        del record["train_loss"]
                    if test is not None:
                        record.update(test)
                    run.write(record)
                    run.progress(step, f"loss {loss_value:.4f}")
                window.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if run.due(step, final=final):
                guard.before_checkpoint(step, dp.local_params())  # a checkpoint never holds a diverged model
                _checkpoint(run, dp, step, world_size, rank, final)
                guard.saved(step)
        run.save_model(_full_state_dict(model))  # rank 0's run writes it; every rank gathers a sharded model's parts
        dist.barrier()  # nobody leaves while rank 0 still writes the last checkpoint
    except Diverged as err:  # every rank stops here, at the same step; the last good checkpoint stays as it is
        run.write({"step": step, "diverged": str(err)})
        raise
    finally:
        dp.close()
    if rank != 0:
        return None
    summary: dict[str, Any] = {"steps": train_cfg.steps, "train_loss": loss_value, "resumed_at": start_step,
                               "seconds": time.perf_counter() - started}
    if test is not None:
        summary.update(test)
    return summary
