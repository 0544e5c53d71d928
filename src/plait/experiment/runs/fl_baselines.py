"""`fl.baselines = true`: after a simulated run, each client trained alone and one model trained on all the data, at
the run's compute (federated/baselines.py), and by how much the run beats the first and how far it is from the
second. Written to the run directory:

    baselines.jsonl  one line per result as soon as it is measured: {"baseline": "central", "epochs": 19,
                     "accuracy": 0.986, "train_loss": 0.02, "setting": ...} first ("diverged_at_epoch": 7 when
                     its training loss stopped being finite there: it stops), then {"baseline": "local", "client":
                     7, ...} for each client; measuring them can take as long as the run did, so `--resume` goes
                     on from the lines there (those of another setting, `fingerprint`: more rounds, another plan or
                     seed, are measured again)
    baselines_central.pt  the one model on all the data after its last saved epoch (CENTRAL_SAVE_EVERY_S), which
                     `--resume` goes on from; deleted once its result is in baselines.jsonl
    baselines.json   the summary: local_accuracy_mean / _p10 / _p90, central_accuracy, and, when the run evaluated
                     the test set, fl_accuracy (its last test accuracy), beats_local_by (FL minus the clients' mean)
                     and short_of_central_by (one model on all the data minus FL; negative when FL ends above it);
                     central_diverged_at_epoch when it diverged

Under `fl.executor = "distributed"`, rank 0 alone measures them, on its own executor. With `fl.buffers = "local"` each
baseline is scored with the buffers its training left (FL's test accuracy uses the global model's).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from plait.experiment.progress import progress_bar
from plait.federated.baselines import (
    baseline_plan,
    central_accuracy,
    central_epochs,
    central_model,
    compared,
    equivalent_epochs,
    local_accuracies,
    local_summary,
)
from plait.federated.server import FederatedServer
from plait.runtime.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from plait.runtime.metrics_log import MetricsLog, last_number, read_metrics

RESULTS_FILE = "baselines.jsonl"
SUMMARY_FILE = "baselines.json"
CENTRAL_CHECKPOINT = "baselines_central.pt"  # the central model between epochs, until its result is written
CENTRAL_SAVE_EVERY_S = 30.0  # saved after an epoch once this long has passed since the last save: a stop loses the
                             # epoch under way and at most this before it (a save after each of a small model's
                             # epochs would cost more than the epoch)


def run_baselines(server: FederatedServer, rounds: int, run_path: Path, fl_accuracy: float | None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Both baselines for a run of `rounds` rounds, from what `run_path/baselines.jsonl` holds for the same setting
    and measured for the rest; the summary, also written to `run_path/baselines.json`."""
    path = Path(run_path) / RESULTS_FILE
    epochs, setting = equivalent_epochs(server, rounds), fingerprint(server, rounds)
    central_setting = fingerprint(server, rounds, central=True)
    kept = read_metrics(path)  # up to a line a stop cut short: rewritten without it, so appending goes on cleanly
    atomic_write_bytes(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")))
    known = [r for r in kept if r.get("setting") == setting]
    alone = {int(r["client"]): float(r["accuracy"]) for r in known
             if r.get("baseline") == "local" and 0 <= r.get("client", -1) < server.data.num_clients}
    central = next((r for r in kept if r.get("baseline") == "central" and r.get("setting") == central_setting), None)
    with MetricsLog(path) as results:
        if central is None:  # first, the one long measurement, from its last saved epoch
            central = {"baseline": "central", "epochs": central_epochs(server, rounds),
                       **_central(server, rounds, Path(run_path) / CENTRAL_CHECKPOINT, central_setting,
                                  show_progress),
                       "setting": central_setting}
            results.write(central)
            (Path(run_path) / CENTRAL_CHECKPOINT).unlink(missing_ok=True)
        with progress_bar(f"baselines: each client alone ({_epochs(epochs)})", server.data.num_clients, len(alone),
                          show_progress) as bar:
            for cid, accuracy in local_accuracies(server, rounds, skip=set(alone)):
                alone[cid] = accuracy
                results.write({"baseline": "local", "client": cid, "epochs": epochs, "accuracy": accuracy,
                               "setting": setting})
                bar.advance(len(alone))
    diverged = {"central_diverged_at_epoch": central["diverged_at_epoch"]} if "diverged_at_epoch" in central else {}
    summary = compared(fl_accuracy, {**local_summary([alone[c] for c in sorted(alone)], epochs),
                                     "central_epochs": int(central["epochs"]),
                                     "central_accuracy": float(central["accuracy"]),
                                     **diverged, **({"steps_capped": True} if server.config.plan.max_steps else {}),
                                     **({"central_lr": server.config.central_lr} if server.config.central_lr else {})})
    text = json.dumps(summary, indent=1).encode("utf-8")
    atomic_write_bytes(Path(run_path) / SUMMARY_FILE, lambda f: f.write(text))
    return summary


def _central(server: FederatedServer, rounds: int, checkpoint: Path, setting: str,
             show_progress: bool) -> dict[str, Any]:
    """One model on all the data, saved to `checkpoint` after an epoch once CENTRAL_SAVE_EVERY_S have passed since
    the last save, and resumed from there when it holds this setting's: {"accuracy": its test accuracy,
    "train_loss": its last epoch's mean training loss, "diverged_at_epoch": the epoch whose loss was not finite,
    when one was}."""
    saved = load_checkpoint(checkpoint) if checkpoint.exists() else {}
    if saved.get("setting") != setting:
        saved = {"epochs": 0}
    epochs, last_save = central_epochs(server, rounds), time.monotonic()
    result: dict[str, Any] = {}
    with progress_bar(f"baselines: one model on all the data ({_epochs(epochs)})", epochs, saved["epochs"],
                      show_progress) as bar:
        def after_epoch(done: int, params: torch.Tensor, buffers: torch.Tensor | None, loss: float) -> None:
            nonlocal last_save
            result["train_loss"] = loss
            bar.advance(done, f"train loss {loss:.4g}")
            if done < epochs and math.isfinite(loss) and time.monotonic() - last_save >= CENTRAL_SAVE_EVERY_S:
                save_checkpoint(checkpoint, {"setting": setting, "epochs": done, "params": params, "buffers": buffers})
                last_save = time.monotonic()

        params, buffers, diverged = central_model(server, rounds, saved.get("params"), saved.get("buffers"),
                                                  saved["epochs"], after_epoch)
    return {"accuracy": central_accuracy(server, params, buffers), **result,
            **({"diverged_at_epoch": diverged} if diverged else {})}


def fingerprint(server: FederatedServer, rounds: int, central: bool = False) -> str:
    """What a baseline's result depends on, hashed: the clients' plan at the run's compute, the seed, the initial
    weights (the model), the clients' sizes and the test set's; `central`: the central model's, which adds its own
    rate when fl.central_lr sets one. A result measured under another setting (a run resumed with other overrides)
    is measured again rather than reused."""
    data = server.data
    parts = [repr(baseline_plan(server, rounds, seed=0)), server.seed, server.config.buffers,
             type(server.task).__qualname__,
             zlib.crc32(server.initial_params.detach().cpu().numpy().tobytes()),
             [data.num_examples(cid) for cid in range(data.num_clients)], len(data.test_y)]
    if server.config.plan.max_steps:  # counted in steps (baselines.py); uncapped settings keep their old hash
        parts.append(f"steps capped at {server.config.plan.max_steps} a round")
    if central and server.config.central_lr:  # without one, the clients' setting (results measured before it)
        parts.append(f"central lr {server.config.central_lr}")
    return hashlib.sha1(json.dumps(parts).encode("utf-8")).hexdigest()[:16]


def describe(summary: dict[str, Any]) -> str:
    """One line: what FL beats and what it approaches, in points of test accuracy."""
    alone = (f"each client alone {summary['local_accuracy_mean']:.2%} (p10-p90 {summary['local_accuracy_p10']:.2%}-"
             f"{summary['local_accuracy_p90']:.2%})")
    central = f"one model on all the data {summary['central_accuracy']:.2%}" + (
        f" (at lr {summary['central_lr']:g})" if "central_lr" in summary else "") + (
        f" (its training diverged at epoch {summary['central_diverged_at_epoch']})"
        if "central_diverged_at_epoch" in summary else "")
    head = f"baselines at {_epochs(summary['local_epochs'])}" if not summary.get("steps_capped") else \
        f"baselines at the run's steps (capped by fl.plan.max_steps; at most {_epochs(summary['local_epochs'])})"
    if "fl_accuracy" not in summary:
        return f"{head}: {alone}; {central}"
    gap, beats = summary["short_of_central_by"], summary["beats_local_by"]
    verdict = f"beats {alone} by" if beats >= 0 else f"falls short of {alone} by"
    return (f"{head}: FL's {summary['fl_accuracy']:.2%} {verdict} {100 * abs(beats):.1f} points; {central}, "
            f"{100 * abs(gap):.1f} points {'above' if gap >= 0 else 'below'} FL's")


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def last_test_accuracy(metrics_path: Path) -> float | None:
    """The run's last recorded test accuracy (None when it never evaluated)."""
    return last_number(metrics_path, "test_accuracy")
