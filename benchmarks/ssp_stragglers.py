"""Time to reach a target test loss with one worker slowed 3x, under BSP, SSP(3) and ASP.

    .venv/bin/python benchmarks/ssp_stragglers.py [--quick] [--workers 4] [--step-ms 20]

Four workers (--workers) and one server on this machine train the FedAvg 2NN on MNIST (SGD on the server, batch 256
per worker). Each worker emulates a device of fixed speed: its step (about 5-8 ms of real compute) is padded to
--step-ms of compute, and a slowed step to 3x that. The padding makes the benchmark model separate machines: 4
workers, a server and an evaluator share this host's cores, and with unpadded steps the contention for them, not
the waiting, set the pace, and did so differently under BSP (workers compute together) and SSP (they drift apart).
--step-ms 0 measures the unpadded, contended case (the slowed worker then sleeps 2x its own compute time).

Two scenarios, each run under the three models. Rotating (the headline): at clock c, worker c mod N is the slow
one, the transient stragglers behind Ho et al.'s (2013) SSP gains. Fixed: worker 0 is slow at every clock; there
SSP(s) can gain only its first s clocks, after which the fast workers wait s clocks ahead of the straggler as they
would under BSP, so the expected ratio is about 1 - (N-1)s / (N K) for a target reached at clock K (printed).

The clock starts at the first worker's first step (the launcher starts all workers together once every one is
up); the launcher's evaluator scores the weights on 1000 test images every 0.1 s. Reference: BSP. Writes the
loss-vs-time plot to benchmarks/results/ssp_stragglers.png (ssp_stragglers_quick.png with --quick).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt  # with no display, matplotlib draws with Agg by itself

from plait.experiment.runs.parameter_server import run_ps
from plait.ps.config import PSRunConfig
from plait.ps.consistency import Consistency
from plait.runtime.metrics_log import read_metrics

MODES = ("bsp", "ssp:3", "asp")
RESULTS = Path(__file__).parent / "results"


def run_one(root: Path, consistency: str, scenario: str, steps: int, target: float, workers: int,
            step_s: float) -> dict:
    config = PSRunConfig()
    config.run.root, config.run.name = str(root), f"{scenario}-{consistency.replace(':', '')}"
    config.data.test_examples = 1000
    config.train.steps, config.train.batch_size, config.train.eval_every_s = steps, 256, 0.1
    config.train.target_loss = target
    config.sync.servers, config.sync.checkpoint_every = 1, 0
    config.sync.consistency = Consistency.from_setting(consistency)
    config.optimizer.name, config.optimizer.lr = "sgd", 0.2
    config.straggler.factor, config.straggler.worker, config.straggler.mode = 3.0, 0, scenario
    config.straggler.step_s = step_s
    summary = run_ps(config, workers, timeout_s=900, show_progress=False)
    run_dir = root / config.run.name
    logs = [read_metrics(run_dir / f"worker-{rank}.jsonl") for rank in range(workers)]
    t0 = min(log[0]["time"] - log[0]["step_s"] for log in logs)  # a worker's record is written as its step ends
    curve = [(r["time"] - t0, r["test_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "test_loss" in r]
    reached = next((t for t, loss in curve if loss <= target), None)
    train_s = max(log[-1]["time"] for log in logs) - t0
    # The clock the slowest worker had finished when the target was reached (BSP: the clock every worker is at).
    clock_at_target = None if reached is None else min(
        sum(1 for r in log if r["time"] - t0 <= reached) for log in logs)
    return {"consistency": consistency, "scenario": scenario, "time_to_target_s": reached, "curve": curve,
            "clock_at_target": clock_at_target,
            "final_loss": summary.final.get("test_loss"), "max_staleness": max(summary.max_staleness.values()),
            "pushes_per_s": sum(len(log) for log in logs) / train_s, "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=20.0,
                        help="emulated compute time of a worker's step (0: the real, contended compute time)")
    args = parser.parse_args()
    step_s = args.step_ms / 1000
    workers = args.workers
    steps, target, repeats = (120, 0.7, 1) if args.quick else (200, 0.5, 3)
    root = Path(tempfile.mkdtemp(prefix="ssp-stragglers-"))
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(repeats):  # interleaved, so a busy spell of the shared machine hits every mode alike
        for scenario in ("fixed", "rotating"):
            for mode in MODES:
                result = run_one(root / f"r{repeat}", mode, scenario, steps, target, workers, step_s)
                runs.setdefault((scenario, mode), []).append(result)
                reached = result["time_to_target_s"]
                print(f"{scenario:>8} {mode:>6}: target loss {target} after "
                      f"{'not reached' if reached is None else f'{reached:.2f} s'}, final loss "
                      f"{result['final_loss']:.3f}, slowest worker at clock {result['clock_at_target']}, "
                      f"max staleness {result['max_staleness']}, "
                      f"{result['pushes_per_s']:.0f} pushes/s over {result['train_s']:.1f} s", flush=True)
    results = {}
    for key, trials in runs.items():  # the run with the median time to target (not reached counts as slowest)
        ordered = sorted(trials, key=lambda r: float("inf") if r["time_to_target_s"] is None else r["time_to_target_s"])
        results[key] = ordered[len(ordered) // 2]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scenario in zip(axes, ("fixed", "rotating")):
        for mode in MODES:
            curve = results[(scenario, mode)]["curve"]
            ax.plot([t for t, _ in curve], [loss for _, loss in curve], label=mode)
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target}")
        ax.set_title(f"{workers} workers, {'worker 0' if scenario == 'fixed' else 'a rotating worker'} slowed 3x"
                     + (f", {args.step_ms:g} ms steps" if step_s else ""))
        ax.set_xlabel("seconds since the first step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("test loss")
    fig.tight_layout()
    suffix = (("" if workers == 4 else f"_{workers}workers") + ("" if args.step_ms == 20 else f"_{args.step_ms:g}ms")
              + ("_quick" if args.quick else ""))
    plot = RESULTS / f"ssp_stragglers{suffix}.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")

    lines = []
    steps_label = f"{args.step_ms:g} ms steps" if step_s else "unpadded steps"
    for scenario in ("fixed", "rotating"):  # rotating (transient stragglers, Ho et al.'s setting) is the headline
        bsp = results[(scenario, "bsp")]
        if scenario == "fixed" and bsp["clock_at_target"]:
            k, s = bsp["clock_at_target"], 3
            print(f"fixed straggler: BSP reached the target at clock {k}; SSP({s}) can gain only its first {s} clocks, "
                  f"an expected ratio of about 1 - (N-1)s/(NK) = {1 - (workers - 1) * s / (workers * k):.3f}")
        for mode in ("asp", "ssp:3"):
            value, reference = results[(scenario, mode)]["time_to_target_s"], bsp["time_to_target_s"]
            ratio = value / reference if value is not None and reference is not None else None
            metric = (f"seconds to test loss {target}, {mode} vs bsp, {workers} workers, {scenario} 3x straggler, "
                      f"{steps_label}")
            lines.append({"benchmark": "ssp_stragglers", "metric": metric,
                          "plait": None if value is None else round(value, 3),
                          "reference": None if reference is None else round(reference, 3),
                          "ratio": None if ratio is None else round(ratio, 3),
                          "goal": 0.6 if mode == "ssp:3" and scenario == "rotating" else None})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
