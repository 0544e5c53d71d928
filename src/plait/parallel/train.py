"""Data-parallel training: `plait train CONFIG.toml --nproc N`, or the same command under torchrun.

One node, N local ranks (spawned here, gloo on CPU):

    plait train examples/data_parallel.toml --nproc 2 [--allreduce ring] [--resume] [--set train.steps=500]

One node under torchrun (restarts the whole group from the last checkpoint if a rank dies, up to 3 times):

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 -m plait.cli train examples/data_parallel.toml

Two nodes (run on each; node 0's address reachable from node 1, and the run directory on node 0 is where
checkpoints are written and read — rank 0 reads them and broadcasts to the others on resume):

    torchrun --nnodes 2 --nproc-per-node 2 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint NODE0_HOST:29400 --rdzv-id plait-dp -m plait.cli train examples/data_parallel.toml

Under torchrun `--nproc` is ignored (torchrun decides the world), and a restarted group resumes by itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.core.models import build_model
from plait.data.images import load_image_set
from plait.experiment.plots import plot_run
from plait.experiment.progress import progress_bar
from plait.experiment.rundir import RunDir, prepare_run_dir
from plait.experiment.sinks import MetricSinks
from plait.parallel.comm_hooks import make_comm_hook
from plait.parallel.compression import GradCompressor
from plait.parallel.config import DataParallelRunConfig
from plait.parallel.data_parallel import DataParallel
from plait.parallel.device import rank_device, use_device
from plait.parallel.dims import ParallelDims
from plait.parallel.launch import run_from_env, spawn_ranks
from plait.parallel.optim import state_matches
from plait.parallel.sampler import ShardedSampler
from plait.parallel.sharded import ShardedDataParallel
from plait.runtime.checkpoint import load_checkpoint, save_checkpoint
from plait.runtime.metrics_log import elapsed_so_far, truncate_metrics
from plait.settings.config import ConfigError, apply_overrides, from_dict, load_toml

_MEAN, _STD = 0.1307, 0.3081  # MNIST pixel statistics
_METRICS = ("loss", "bytes_sent", "bytes_recv", "compute_s", "comm_s", "step_s")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def load_config(config_path: Path, overrides: list[str], allreduce: str | None) -> DataParallelRunConfig:
    raw = apply_overrides(load_toml(config_path), overrides)
    if allreduce is not None:
        raw.setdefault("parallel", {})["allreduce"] = allreduce
    return from_dict(DataParallelRunConfig, raw)


def main(config_path: Path, nproc: int, resume: bool, overrides: list[str], allreduce: str | None) -> None:
    try:
        config = load_config(config_path, overrides, allreduce)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    backend = None if config.parallel.backend == "auto" else config.parallel.backend
    if under_torchrun():
        summary = run_from_env(train_rank, config, resume, backend=backend)
    else:
        if nproc < 1:
            print(f"error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
            raise SystemExit(2)
        run = RunDir(Path(config.run.root) / config.run.name)
        problem = ""  # checked here too, so a mistake fails before any rank is spawned
        if resume and not run.checkpoint_path.exists():
            problem = f"--resume: no checkpoint at {run.checkpoint_path}"
        elif not resume and (run.metrics_path.exists() or run.checkpoint_path.exists()):
            problem = f"run directory {run.path} already holds a run; use --resume or another run.name"
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        summary = spawn_ranks(train_rank, nproc, config, resume, backend=backend, timeout_s=float("inf"),
                              threads_per_rank=config.parallel.threads_per_rank)[0]
    if summary:
        acc = summary.get("accuracy")
        print(f"steps: {summary['steps']}  final loss: {summary['loss']:.4f}"
              + (f"  test accuracy: {acc:.4f}" if acc is not None else "")
              + f"  ({summary['seconds']:.1f} s)")
        print(f"run directory: {summary['run_dir']}")
        for path in plot_run(summary["run_dir"]):
            print(f"plot: {path}")


# ---- one rank -------------------------------------------------------------------------------------------------------
def _prepare_run(config: DataParallelRunConfig, resume: bool, rank: int,
                 device: torch.device) -> tuple[RunDir, bool]:
    """Rank 0 prepares the run directory; every rank learns whether a checkpoint is resumed."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run = RunDir(Path(config.run.root) / config.run.name)
    status = torch.zeros(2, dtype=torch.int64, device=device)  # [ok, resuming]; NCCL sends device tensors only
    error = ""
    if rank == 0:
        try:
            resuming = resume or (restarts > 0 and run.checkpoint_path.exists())
            if restarts > 0 and not resuming and run.metrics_path.exists():
                run.metrics_path.unlink()  # died before the first checkpoint: start over
            run = prepare_run_dir(config.run.root, config.run.name, resume=resuming)
            if not resuming:
                run.write_config(config)
            status[:] = torch.tensor([1, int(resuming)], device=device)
        except (FileExistsError, FileNotFoundError, OSError) as err:
            error = str(err)
    dist.broadcast(status, src=0)
    if not status[0]:
        raise RuntimeError(error or "rank 0 could not prepare the run directory")
    return run, bool(status[1])


def _load_images(config: DataParallelRunConfig) -> dict[str, torch.Tensor]:
    arrays = load_image_set(config.data.name, config.data.path or None,
                            Path(config.data.cache_dir) if config.data.cache_dir else None)
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def _batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, device: torch.device):
    """Gather on the host, copy to the device: from pinned memory the copy is asynchronous (non_blocking)."""
    x, y = images[idx], labels[idx]
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    x = x.to(device, non_blocking=True).to(torch.float32).div_(255.0).sub_(_MEAN).div_(_STD).unsqueeze(1)
    return x, y.to(device, non_blocking=True)


def _straggler_delay(config: DataParallelRunConfig, rank: int, step: int, last_compute_s: float) -> float:
    cfg = config.stragglers
    if rank not in cfg.ranks or cfg.factor <= 1 or last_compute_s <= 0:
        return 0.0
    if cfg.probability < 1 and random.Random(f"{config.run.seed}:{rank}:{step}").random() >= cfg.probability:
        return 0.0
    return (cfg.factor - 1.0) * last_compute_s


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), 2000):
        idx = torch.arange(start, min(start + 2000, len(labels)))
        x, y = _batch(images, labels, idx, device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / len(labels)


def _checkpoint(run: RunDir, dp: DataParallel, step: int, world_size: int, rank: int) -> None:
    """Rank 0 writes; with error feedback every rank takes part (its residuals are gathered into the file)."""
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
    save_checkpoint(run.checkpoint_path, state)


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


def _resume(run: RunDir, dp: DataParallel, rank: int, world_size: int) -> int:
    """Rank 0 reads the checkpoint and broadcasts it (other nodes need no copy of the run directory); each rank
    gets back its own error-feedback residuals and communication-hook state."""
    device = dp.device  # NCCL broadcasts device tensors only
    meta = torch.zeros(3, dtype=torch.int64, device=device)  # [step, residuals, hook states] (for this world)
    ckpt: dict[str, Any] = {}
    optim: dict[str, torch.Tensor] = {}
    if rank == 0:
        ckpt = load_checkpoint(run.checkpoint_path)
        if ckpt["params"].numel() != dp.num_params:
            raise ValueError(f"checkpoint {run.checkpoint_path} holds {ckpt['params'].numel()} parameters, the "
                             f"model has {dp.num_params}: was model.name changed?")
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


def train_rank(rank: int, world_size: int, config: DataParallelRunConfig, resume: bool) -> dict[str, Any] | None:
    """The training loop of one rank (spawned, or under torchrun). Rank 0 returns a summary."""
    started = time.perf_counter()
    config.check_world(world_size)
    dims = ParallelDims(world_size=world_size).build()
    device = rank_device()  # cuda:LOCAL_RANK under NCCL, else the CPU; everything below is made there
    use_device(device)
    run, resuming = _prepare_run(config, resume, rank, device)
    pid_dir = run.path / "ranks"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))  # lets an operator (or a test) kill one rank

    data = _load_images(config)
    train_cfg = config.train
    torch.manual_seed(config.run.seed)
    model = build_model(config.model.name).to(device)
    hook_cfg = config.comm_hook
    comm_hook = make_comm_hook(hook_cfg.name, rank=hook_cfg.rank, start_step=hook_cfg.start_step,
                               ratio=hook_cfg.ratio, error_feedback=hook_cfg.error_feedback, seed=config.run.seed)
    compressor = None
    if config.compression.codec != "none":
        compressor = GradCompressor(config.compression.codec, ratio=config.compression.ratio,
                                    error_feedback=config.compression.error_feedback,
                                    seed=config.run.seed * 1000 + rank)
    if config.sync.kind == "sharded":
        dp = ShardedDataParallel(model, dims, optimizer=train_cfg.optimizer, lr=train_cfg.lr,
                                 momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay,
                                 betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                                 precision=train_cfg.precision)
    else:
        dp = DataParallel(model, dims, kind=config.sync.kind, allreduce=config.parallel.allreduce,
                          local_steps=config.sync.local_steps, bucket_bytes=int(config.parallel.bucket_mb * 2**20),
                          overlap=config.parallel.overlap, optimizer=train_cfg.optimizer, lr=train_cfg.lr,
                          momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay,
                          betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps, compressor=compressor,
                          comm_hook=comm_hook, precision=train_cfg.precision,
                          shard_optimizer=config.sync.shard_optimizer)
    dp.broadcast_params()
    start_step = _resume(run, dp, rank, world_size) if resuming else 0
    if rank == 0 and resuming:
        truncate_metrics(run.metrics_path, "step", start_step)  # steps after the checkpoint are redone once
        started -= elapsed_so_far(run.metrics_path)  # elapsed_s goes on from the steps the log keeps
    sampler = ShardedSampler(len(data["train_y"]), batch_size=train_cfg.batch_size,
                             accumulate=train_cfg.accumulate, rank=rank, world_size=world_size, seed=config.run.seed)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = MetricSinks(run.path, "step", resume_after=start_step if resuming else None,
                      tensorboard=config.run.tensorboard) if rank == 0 else None  # jsonl, csv, TensorBoard
    window = torch.zeros(len(_METRICS), dtype=torch.float64)  # host sums since the last record (times, bytes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # the loss stays on the device until logged
    gathered = [torch.zeros(len(_METRICS), dtype=torch.float64, device=device) for _ in range(world_size)]
    last_bytes = dp.bytes_moved()
    window_start, window_steps, last_compute = time.perf_counter(), 0, 0.0
    loss_value, accuracy = float("nan"), None
    stack = contextlib.ExitStack()
    bar = stack.enter_context(progress_bar("steps", train_cfg.steps, start_step, enabled=rank == 0))
    try:
        for step in range(start_step + 1, train_cfg.steps + 1):
            idx = sampler.indices(step)
            batches = [_batch(data["train_x"], data["train_y"], part, device) for part in idx]
            delay = _straggler_delay(config, rank, step, last_compute)
            loss, times = dp.train_step(batches, step, delay_s=delay)
            last_compute = times.compute_s - delay
            loss_sum += loss  # no host sync: float(loss) would wait for the device every step
            window[3:] += torch.tensor([times.compute_s, times.comm_s, times.total_s], dtype=torch.float64)
            window_steps += 1
            final = step == train_cfg.steps
            if final and config.sync.kind == "local_sgd" and step % config.sync.local_steps:
                dp.average_params()  # the run ends with one model, not world_size of them
            if step % train_cfg.log_every == 0 or final:
                sent, recv = dp.bytes_moved()
                window[1:3] = torch.tensor([sent - last_bytes[0], recv - last_bytes[1]], dtype=torch.float64)
                last_bytes = (sent, recv)
                mine = window.to(device)
                mine[0] = loss_sum
                dist.all_gather(gathered, mine / window_steps)  # one small message
                loss_sum.zero_()
                per_rank = torch.stack(gathered).cpu()
                elapsed = time.perf_counter() - window_start
                loss_value = float(per_rank[:, 0].mean())
                if final and rank == 0 and train_cfg.eval_at_end:
                    accuracy = evaluate(model, data["test_x"], data["test_y"], device)
                if log is not None:
                    record = {"step": step, "loss": loss_value,
                              "samples_per_s": window_steps * sampler.per_step / elapsed,
                              "bytes_sent": [int(v) for v in per_rank[:, 1]],
                              "bytes_recv": [int(v) for v in per_rank[:, 2]],
                              "compute_s": [round(float(v), 6) for v in per_rank[:, 3]],
                              "comm_s": [round(float(v), 6) for v in per_rank[:, 4]],
                              "step_s": elapsed / window_steps, "restart": restarts,
                              "elapsed_s": time.perf_counter() - started}
                    if accuracy is not None:
                        record["accuracy"] = accuracy
                    log.write(record)
                    bar.advance(step, f"loss {loss_value:.4f}")
                window.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0) or final:
                _checkpoint(run, dp, step, world_size, rank)
        dist.barrier()  # nobody leaves while rank 0 still writes the last checkpoint
    finally:
        stack.close()
        if log is not None:
            log.close()
        dp.close()
    if rank != 0:
        return None
    return {"run_dir": str(run.path), "steps": train_cfg.steps, "loss": loss_value, "accuracy": accuracy,
            "seconds": time.perf_counter() - started}
