"""Plait's federated simulator against Flower's simulation (Ray, 2 actors) on the same FedAvg workloads (issue 13):
start-up, seconds per round, peak memory of the whole process tree, and the two cores' compute floor of the CNN round.

    .venv/bin/python benchmarks/sim_vs_flower.py --quick                 # every row, about 10 minutes
    .venv/bin/python benchmarks/sim_vs_flower.py                         # 5 runs of 8 rounds: about 25 minutes
    .venv/bin/python benchmarks/sim_vs_flower.py --rows 2nn_100 --runs 1 --rounds 2 --clients-scale 0.1   # a check

FedAvg on real MNIST (pathological non-IID shards), E=1, B=10, lr 0.05, C=0.1, test-set evaluation every round; rows
`2nn_1000` (2NN, 1000 clients, 100 a round), `2nn_100` (10 a round), `cnn_100` (the paper's CNN, 10 a round). Plait's
own data loading materialises each row's partition; every client's arrays go to .npy files that the Flower side
(benchmarks/flower_reference.py) loads, with the same model definitions and seed. Each side runs as its own process,
as a user starts it: Plait as `python -m plait.cli run CONFIG` with `fl.executor = "auto"` (the choice is reported),
Flower in its own virtual environment; src/plait is byte-compiled first, as an installed package is. Measured per
run: start-up (launch to the first round's results arriving), seconds per round (the rounds after the first), peak
memory of the process tree: the sum of its processes' proportional set sizes (PSS, /proc/PID/smaps_rollup, every 0.5
s: a page k processes share counts 1/k in each), with the sum of their resident sets (RSS, every 0.1 s) shown beside
it. RSS counts a shared page once per process that maps it: libraries in every Ray worker, and the copy-on-write
pages of workers forked from Plait's. The floor is the plain single-thread PyTorch loop's time for the CNN round's
training (10 clients) and test-set evaluation, divided by the cores. Medians over runs and rounds, with min-max.

First use installs Flower (flwr[simulation]==1.42.0, with its pin ray==2.55.1) into .venv-flower/ at the
repository root with `python -m venv` and pip: torch==2.13.0 first (the project's), then Flower with a constraints
file holding torch there. Telemetry of both Ray and Flower is turned off (this machine has no network; a blocked
report must not count as start-up).

Output: a table per row, then one JSON line per metric (ratio = Plait / Flower: lower is better); the last line,
the headline, is the 2NN round at 1000 clients (the simulator's per-client overhead).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

FLWR_VERSION = "1.42.0"
TORCH_VERSION = "2.13.0"  # the project's (Makefile); never let pip choose another
REPO = Path(__file__).resolve().parents[1]
FLOWER_VENV = REPO / ".venv-flower"
POLL_S = 0.02        # how often the first round's results are looked for (start-up resolution)
MEMORY_EVERY = 5     # polls between two samples of the process tree's resident sets (every 0.1 s)
PSS_EVERY = 25       # polls between two samples of its proportional sets (every 0.5 s: 15-30 ms of CPU each)
PLAN = {"epochs": 1, "batch_size": 10, "lr": 0.05}
SEED = 0


@dataclass(frozen=True)
class Row:
    model: str
    num_clients: int
    label: str


ROWS = {
    "2nn_1000": Row("2nn", 1000, "2NN, 1000 clients (100 a round)"),
    "2nn_100": Row("2nn", 100, "2NN, 100 clients (10 a round)"),
    "cnn_100": Row("cnn", 100, "CNN, 100 clients (10 a round)"),
}


@dataclass
class Measured:
    """One side's runs of one row."""
    startup_s: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)       # PSS
    peak_rss_mb: list[float] = field(default_factory=list)   # RSS, shown
    accuracy: list[float] = field(default_factory=list)
    executor: str = ""


# --- Flower's virtual environment ------------------------------------------------------------------------------


def flower_python() -> Path:
    """The Flower venv's python, installing the venv on first use (progress on stdout)."""
    python, stamp = FLOWER_VENV / "bin" / "python", FLOWER_VENV / ".installed"
    wanted = f"flwr[simulation]=={FLWR_VERSION} torch=={TORCH_VERSION}"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    print(f"installing Flower into {FLOWER_VENV} (first use): {wanted}", flush=True)
    if not python.exists():
        print("  [1/4] python -m venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    print(f"  [2/4] torch=={TORCH_VERSION} (before Flower: an unpinned torch would be a multi-GB CUDA build)",
          flush=True)
    _pip(pip + [f"torch=={TORCH_VERSION}"], "torch")
    constraints = FLOWER_VENV / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    print(f"  [3/4] flwr[simulation]=={FLWR_VERSION} (with ray), torch held at {TORCH_VERSION}", flush=True)
    _pip(pip + ["-c", str(constraints), f"flwr[simulation]=={FLWR_VERSION}"], "flwr[simulation]")
    print("  [4/4] checking the imports", flush=True)
    check = subprocess.run([str(python), "-c", "import flwr, ray, torch; print(flwr.__version__, ray.__version__, "
                            "torch.__version__)"], capture_output=True, text=True)
    if check.returncode:
        sys.exit(f"the Flower venv {FLOWER_VENV} does not import flwr, ray and torch:\n{check.stderr[-2000:]}")
    print(f"  flwr, ray, torch: {check.stdout.strip()}", flush=True)
    stamp.write_text(wanted + "\n")
    return python


def _pip(command: list[str], what: str) -> None:
    done = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
    if done.returncode == 0:
        return
    sys.stderr.write(done.stderr[-4000:])
    if "ray" in done.stderr and ("No matching distribution" in done.stderr or "Could not find" in done.stderr):
        sys.exit(f"installing {what}: PyPI has no ray wheel that Flower {FLWR_VERSION} accepts for Python "
                 f"{sys.version_info.major}.{sys.version_info.minor} on this platform; Flower's simulation needs "
                 "ray, so the reference cannot run here (use a Python that ray ships wheels for)")
    sys.exit(f"installing {what} into {FLOWER_VENV} failed (pip's error above); delete the folder to start afresh")


# --- the same data on both sides -------------------------------------------------------------------------------


def run_config(row: Row, rounds: int, root: Path, name: str) -> dict:
    return {"run": {"name": name, "root": str(root), "seed": SEED},
            "model": {"name": row.model},
            "data": {"name": "mnist", "num_clients": row.num_clients, "partition": "shards"},
            "fl": {"rounds": rounds, "fraction": 0.1, "eval_every": 1, "executor": "auto", "plan": dict(PLAN)}}


def prepare(row: Row, folder: Path, floor_repeats: int) -> list[float]:
    """Write the row's partition for Flower (and, for the CNN, time the floor) in a child process: this one must not
    map torch, or a share of torch's pages would count to it rather than to the trees it measures (PSS)."""
    command = [sys.executable, str(REPO / "benchmarks" / "sim_vs_flower_prepare.py"), "--model", row.model,
               "--num-clients", str(row.num_clients), "--out", str(folder), "--seed", str(SEED),
               "--floor-repeats", str(floor_repeats if row.model == "cnn" else 0),
               "--lr", str(PLAN["lr"]), "--batch-size", str(PLAN["batch_size"])]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                             os.environ.get("PYTHONPATH", "")])})
    if done.returncode:
        sys.exit(f"preparing {row.label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["floor_s"]


# --- one run of one side, watched from outside -----------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, pids, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(tree.get(pid, []))
    return pids


def rss_mb(pids: list[int]) -> float:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError):
            continue
    return total / 2**20


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                          if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 2**10


def watch(command: list[str], env: dict[str, str], progress: Path,
          log: Path) -> tuple[float, tuple[float, float], list[dict]]:
    """Run `command` to its end; (start-up s, (peak PSS, peak RSS) MB of its process tree, the round records it
    wrote)."""
    launched = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first_round, peak, peak_rss, seen, polls = None, 0.0, 0.0, set(), 0
    while proc.poll() is None:
        if polls % MEMORY_EVERY == 0:  # a scan of /proc costs ~4 ms of CPU: not at every poll
            pids = tree_pids(proc.pid)
            seen.update(pids)
            peak_rss = max(peak_rss, rss_mb(pids))
            if polls % PSS_EVERY == 0:
                peak = max(peak, pss_mb(pids))
        if first_round is None and progress.exists() and progress.stat().st_size:
            first_round = time.perf_counter() - launched
        polls += 1
        time.sleep(POLL_S)
    _end_leftovers(proc.pid, seen)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"{' '.join(command[:4])} ... exited with {proc.returncode}; the end of its log {log}:\n{tail}")
    records = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    return first_round if first_round is not None else time.perf_counter() - launched, (peak, peak_rss), records


def _end_leftovers(group: int, seen: set[int]) -> None:
    """Ray's daemons outliving the driver would skew the next run's memory and time: end what this run started."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    alive = set(tree_pids(1)) & seen  # orphans re-parented to init, by the ids this run's tree had
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_plait(row: Row, rounds: int, work: Path, name: str, into: Measured) -> None:
    config_path = work / f"{name}.toml"
    config_path.write_text(tomli_w.dumps(run_config(row, rounds, work / "runs", name)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run_dir = work / "runs" / name
    startup, peak, records = watch([sys.executable, "-m", "plait.cli", "run", str(config_path)], env,
                                   run_dir / "metrics.jsonl", work / f"{name}.log")
    elapsed = [r["elapsed_s"] for r in records if "round" in r]
    into.startup_s.append(startup)
    into.round_s += [b - a for a, b in zip(elapsed, elapsed[1:])]
    into.peak_mb.append(peak[0])
    into.peak_rss_mb.append(peak[1])
    into.accuracy.append(records[-1].get("test_accuracy", float("nan")))  # the canonical name since the fifth session
    into.executor = tomllib.loads((run_dir / "config.toml").read_text())["fl"]["executor"]


def run_flower(python: Path, row: Row, rounds: int, data: Path, work: Path, name: str, into: Measured) -> None:
    progress = work / f"{name}.jsonl"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [str(python), str(REPO / "benchmarks" / "flower_reference.py"), "--data", str(data),
               "--model", row.model, "--num-clients", str(row.num_clients), "--rounds", str(rounds),
               "--lr", str(PLAN["lr"]), "--batch-size", str(PLAN["batch_size"]), "--epochs", str(PLAN["epochs"]),
               "--seed", str(SEED), "--actors", str(os.cpu_count() or 1), "--out", str(progress)]
    startup, peak, records = watch(command, env, progress, work / f"{name}.log")
    times = [r["time"] for r in records]
    into.startup_s.append(startup)
    into.round_s += [b - a for a, b in zip(times, times[1:])]
    into.peak_mb.append(peak[0])
    into.peak_rss_mb.append(peak[1])
    into.accuracy.append(records[-1]["accuracy"])
    into.executor = "ray"


# --- the floor -------------------------------------------------------------------------------------------------


# --- report ----------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}, n={len(values)})"


def metric_line(metric: str, plait: list[float], reference: list[float], goal: str, reducer=statistics.median,
                **extra) -> str:
    mine, theirs = reducer(plait), reducer(reference)
    return json.dumps({"benchmark": "sim_vs_flower", "metric": metric, "plait": round(mine, 3),
                       "reference": round(theirs, 3), "ratio": round(mine / theirs, 3), "goal": goal,
                       "n": [len(plait), len(reference)], "plait_range": [round(min(plait), 3), round(max(plait), 3)],
                       "reference_range": [round(min(reference), 3), round(max(reference), 3)], **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each row, 4 rounds each")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--runs", type=int, default=0, help="runs per row and side (default 5, quick 3)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per run (default 8, quick 4)")
    parser.add_argument("--floor-repeats", type=int, default=3)
    parser.add_argument("--clients-scale", type=float, default=1.0, help="scale the rows' client counts (checks)")
    parser.add_argument("--keep", default="", help="keep the data, configs and logs in this folder")
    args = parser.parse_args()
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        sys.exit(f"--rows: unknown rows {unknown}; known: {list(ROWS)}")
    runs = args.runs or (3 if args.quick else 5)
    rounds = args.rounds or (4 if args.quick else 8)
    if rounds < 2:
        sys.exit("--rounds must be >= 2: the first round is start-up, seconds per round come from the others")
    python = flower_python()
    # Both sides import Plait's modules from src/ (the Flower side its model definitions). An installed package has
    # their bytecode compiled; a checkout run with PYTHONDONTWRITEBYTECODE=1 (as this machine's shells are) compiles
    # all ~80 of them again at every start, 0.03-0.05 s. Compile them once here, as `pip install` would.
    compileall.compile_dir(REPO / "src" / "plait", quiet=1)
    rows = {n: Row(ROWS[n].model, max(10, int(ROWS[n].num_clients * args.clients_scale)), ROWS[n].label)
            for n in names}

    with tempfile.TemporaryDirectory(prefix="sim_vs_flower-") as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[str, Measured]] = {}
        floor: list[float] = []
        for name, row in rows.items():
            print(f"{row.label}: writing the partition for Flower", flush=True)
            timed = prepare(row, work / f"data_{name}", 0 if floor else args.floor_repeats)
            if row.model == "cnn" and not floor:
                floor = timed
                print(f"  floor (single-thread loop / {os.cpu_count()} cores): {spread(floor)} s", flush=True)
            results[name] = {"plait": Measured(), "flower": Measured()}
            for run in range(runs):  # the sides alternate: a change in the machine's load falls on both
                run_plait(row, rounds, work, f"plait_{name}_{run}", results[name]["plait"])
                run_flower(python, row, rounds, work / f"data_{name}", work, f"flower_{name}_{run}",
                           results[name]["flower"])
                print(f"  run {run + 1}/{runs}: start-up Plait {results[name]['plait'].startup_s[-1]:.2f} s, "
                      f"Flower {results[name]['flower'].startup_s[-1]:.2f} s", flush=True)
        report(rows, results, floor, runs, rounds)


def report(rows: dict[str, Row], results: dict[str, dict[str, Measured]], floor: list[float], runs: int,
           rounds: int) -> None:
    print(f"\n{runs} runs x {rounds} rounds per side and row; medians (min-max, n)")
    for name, row in rows.items():
        for side, measured in results[name].items():
            print(f"{row.label:34} {side:6} start-up {spread(measured.startup_s)} s | round {spread(measured.round_s)}"
                  f" s | peak PSS {max(measured.peak_mb):.0f} MB (RSS {max(measured.peak_rss_mb):.0f})"
                  f" | accuracy {statistics.median(measured.accuracy):.4f}"
                  f" | executor {measured.executor}")
    lines = []
    startup_row = "2nn_100" if "2nn_100" in results else next(iter(results))
    lines.append(metric_line("startup_s", results[startup_row]["plait"].startup_s,
                             results[startup_row]["flower"].startup_s, "<= 0.15", row=startup_row,
                             rows={n: [round(statistics.median(r[s].startup_s), 2) for s in ("plait", "flower")]
                                   for n, r in results.items()}))
    lines.append(metric_line("peak_memory_mb", [m for r in results.values() for m in r["plait"].peak_mb],
                             [m for r in results.values() for m in r["flower"].peak_mb], "<= 0.3", reducer=max,
                             rows={n: [round(max(r[s].peak_mb)) for s in ("plait", "flower")]
                                   for n, r in results.items()},
                             rss_rows={n: [round(max(r[s].peak_rss_mb)) for s in ("plait", "flower")]
                                       for n, r in results.items()}))
    if "2nn_100" in results:
        lines.append(metric_line("round_s_2nn_100", results["2nn_100"]["plait"].round_s,
                                 results["2nn_100"]["flower"].round_s, "(shown)",
                                 executor=results["2nn_100"]["plait"].executor))
    if "cnn_100" in results:
        plait_cnn = statistics.median(results["cnn_100"]["plait"].round_s)
        lines.append(metric_line("round_s_cnn_100", results["cnn_100"]["plait"].round_s,
                                 results["cnn_100"]["flower"].round_s, "<= 1.0, and <= 1.05 of the floor",
                                 executor=results["cnn_100"]["plait"].executor,
                                 floor_s=round(statistics.median(floor), 3),
                                 ratio_to_floor=round(plait_cnn / statistics.median(floor), 3)))
    if "2nn_1000" in results:
        lines.append(metric_line("round_s_2nn_1000", results["2nn_1000"]["plait"].round_s,
                                 results["2nn_1000"]["flower"].round_s, "<= 0.15",
                                 executor=results["2nn_1000"]["plait"].executor))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
