"""`plait sweep CONFIG --vary KEY=V1,V2,... [--vary ...]`: one run per combination of the varied settings, then the
runs compared and the best named.

The mission is to switch one design choice at a time and see what it changes; the FedAvg paper chose each row's
learning rate on a grid this way. Each run is the command a user would type for the config (`plait run` for a
federated simulation's, `plait train --nproc N` for a cluster's), started as its own process with `--set KEY=VALUE`
for its values and its own `run.name`, NAME-<key><value>... (the key's last part: `demo-lr0.05-name-median`), so
one run's failure or its memory never touches the next, and each is a run directory like any other (plot it,
resume it, export it). Every run's config is read and checked before the first starts: a value a setting refuses
stops the sweep with nothing run. Off a terminal, a run's output is echoed line by line under its heading.

Into RUN.root/NAME-sweep go compare.md, compare.csv and the overlaid curves (`plait compare`'s), and sweep.json: the
varied settings, each run's name, values and exit code, and the best run: the fewest rounds to
`fl.target_accuracy` where any run reached it (a record marked target_reached), else the highest final test
accuracy, else the lowest final loss. sweep.json is written after each run, so a stopped sweep says which ran.
`--resume` goes on with a sweep: a run that sweep.json says finished under the same --set is not run again; one
whose directory holds a checkpoint resumes; one that stopped before its first checkpoint (a rate that diverged at
once) is not run again, and said; the others start. Ctrl-C stops the run under way as it would alone (it saves what
it saves), then the sweep.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plait.experiment.planes import PLANE_KEYS, check_ranks, config_class
from plait.experiment.rundir import RunDir
from plait.runtime.checkpoint import atomic_write_bytes
from plait.runtime.metrics_log import read_metrics
from plait.settings.config import ConfigError, apply_overrides, load_toml, typed

Command = Literal["run", "train"]


@dataclass(frozen=True, slots=True)
class Member:
    name: str                    # its run.name
    values: tuple[str, ...]      # "KEY=VALUE" of the varied settings, as --set takes them


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--vary KEY=V1,V2,...` items as (key, values), in the order given."""
    varied: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        listed = [v.strip() for v in _split_values(values)]
        if not sep or not key or not all(listed):
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,... (e.g. --vary fl.plan.lr=0.05,0.1,0.2)")
        if any(key == seen for seen, _ in varied):
            raise ConfigError(f"--vary {key} is given twice: list all its values in one --vary {key}=V1,V2,...")
        if len(set(listed)) < len(listed):
            raise ConfigError(f"--vary {item!r} lists a value twice")
        varied.append((key, listed))
    if not varied:
        raise ConfigError("plait sweep needs at least one --vary KEY=V1,V2,...")
    return varied


def _split_values(text: str) -> list[str]:
    """`V1,V2,...` split at the commas outside brackets and quotes, so a value may be a TOML list or table
    (`[1, 2]`, `{a = 1}`) or a quoted text with a comma."""
    parts, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part, or as many of its last parts as tell it from the others (fl.plan.lr, fl.server_opt.lr:
    plan.lr, server_opt.lr)."""
    for depth in range(1, max(len(k.split(".")) for k in keys) + 1):
        short = {k: ".".join(k.split(".")[-depth:]) for k in keys}
        if len(set(short.values())) == len(keys):
            return short
    return {k: k for k in keys}


def _part(short: str, value: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._+-]", "_", value)
    return f"{short}{text}" if re.match(r"[-+.0-9]", text) else f"{short}-{text}"


def members(base: str, varied: list[tuple[str, list[str]]]) -> list[Member]:
    """Every combination of the varied values, the first key's varying slowest."""
    short = _short_keys([key for key, _ in varied])
    out = []
    for combination in itertools.product(*(values for _, values in varied)):
        pairs = [(key, value) for (key, _), value in zip(varied, combination)]
        name = "-".join([base, *(_part(short[key], value) for key, value in pairs)])
        out.append(Member(name, tuple(f"{key}={value}" for key, value in pairs)))
    if len(out) < 2:
        raise ConfigError("plait sweep: the --vary values give one run; list two or more values to compare")
    names = [m.name for m in out]
    alike = sorted({n for n in names if names.count(n) > 1})
    if alike:
        raise ConfigError(f"plait sweep: two runs would share the name {alike[0]} (values alike once made into a "
                          "name): vary values that differ in letters or digits")
    return out


def command_of(raw: dict[str, Any]) -> Command:
    """`run` for a federated simulation's config (it has an [fl] table), `train` for a cluster's."""
    if "net" in raw:
        raise ConfigError("plait sweep runs federated simulations (plait run) and cluster training (plait train); "
                          "this config has a [net] table: a network run's server and clients start apart (plait fl "
                          "server, plait fl client). Without [net] the same rounds run simulated, and sweep so")
    return "run" if "fl" in raw else "train"


@dataclass(slots=True)
class Plan:
    command: Command
    root: Path
    base: str
    members: list[Member]
    out: Path                                   # RUN.root/NAME-sweep-<the varied keys>
    overrides: list[str]                        # --set, recorded in sweep.json (a resume under others re-runs all)
    done: dict[str, int] = field(default_factory=dict)  # resume: exit codes a stopped sweep recorded


def _read(config: Path, command: Command, overrides: list[str]) -> Any:
    """The config as its command reads it: the plane chosen first, then every override against its schema (a key
    under a shorthand, `model.options.x` below `model = "pkg:make"`, opens its table as the command's would)."""
    raw = load_toml(config)
    chooses = [item for item in overrides if item.split("=", 1)[0].strip().split(".")[0] in PLANE_KEYS]
    cls = config_class(command, apply_overrides(raw, chooses))
    return typed(cls, apply_overrides(raw, overrides, cls))


def plan_sweep(config: Path, vary: list[str], overrides: list[str], resume: bool, nproc: int = 1) -> Plan:
    """The sweep's runs, each one's config read and checked as its command will, the ranks too (a refused value
    stops the sweep before anything runs), and, without `resume`, none of their directories holding a run
    already."""
    command = command_of(load_toml(config))
    varied = parse_vary(vary)
    for key, _ in varied:
        if key in ("run.name", "run.root"):
            raise ConfigError(f"--vary {key}: a sweep's runs are named for their values, side by side in run.root")
    run = _read(config, command, overrides).run
    planned = members(run.name, varied)
    for member in planned:
        checked = _read(config, command, [*overrides, *member.values])
        if command == "train":
            check_ranks(checked, nproc)
    root = Path(run.root)
    out = root / "-".join([run.name, "sweep", *_short_keys([key for key, _ in varied]).values()])
    done: dict[str, int] = {}
    if resume:
        done = _recorded(out / SUMMARY_FILE, overrides)
    else:
        held = [m.name for m in planned if _holds_a_run(root / m.name)]
        if held:
            raise FileExistsError(f"{root} already holds runs of this sweep ({', '.join(held)}): --resume to go on "
                                  "with it, or another run.name")
    return Plan(command, root, run.name, planned, out, list(overrides), done)


def _recorded(path: Path, overrides: list[str]) -> dict[str, int]:
    """The exit codes a stopped sweep recorded, when it ran under the same --set (else none: every run goes on)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if summary.get("set") != overrides:
        return {}
    return {r["name"]: r["exit_code"] for r in summary.get("runs", []) if isinstance(r.get("exit_code"), int)}


def _holds_a_run(path: Path) -> bool:
    run = RunDir(path)
    return run.checkpoint_path.exists() or run.metrics_path.exists()


def next_step(plan: Plan, member: Member, resume: bool) -> Literal["start", "resume", "finished", "stopped early"]:
    """What a member's run does now: on `resume`, one that finished under the same --set is not run again, one with
    a checkpoint goes on, one that stopped before its first is not run again (it would be refused); else it
    starts."""
    run = RunDir(plan.root / member.name)
    if not resume:
        return "start"
    if plan.done.get(member.name) == 0:
        return "finished"
    if run.checkpoint_path.exists():
        return "resume"
    return "stopped early" if run.metrics_path.exists() else "start"


def member_argv(plan: Plan, config: Path, member: Member, nproc: int, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "plait.cli", plan.command, str(config)]
    if plan.command == "train":
        argv += ["--nproc", str(nproc)]
    if resume:
        argv.append("--resume")
    for item in [*plan.overrides, *member.values, f"run.name={member.name}"]:
        argv += ["--set", item]
    return argv


def run_member(argv: list[str], echo: Callable[[str], None] | None) -> int:
    """The member's command and its exit code; its output to this terminal, or, with `echo` (off a terminal), line
    by line to it. Ctrl-C reaches the run as it would alone (the terminal signals the whole group), and this process
    waits for it to stop as it stops (a parameter server writes its final checkpoints) instead of killing it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if echo else None, stderr=subprocess.STDOUT if echo else None,
                            text=True, bufsize=1)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the start: the run keeps the default handler
    try:
        if echo is not None:
            assert proc.stdout is not None
            for line in proc.stdout:
                echo(line.rstrip("\n"))
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def best_member(names: list[str], root: Path) -> tuple[str, str] | None:
    """The best of the runs `names` under `root` and why: the fewest rounds or steps to the target where any reached
    it, else the highest final test accuracy, else the lowest final loss (None: no run logged any of them)."""
    logs = {name: read_metrics(root / name / "metrics.jsonl") for name in names}
    reached = {name: _reached_at(records) for name, records in logs.items()}
    hit = {name: step for name, step in reached.items() if step is not None}
    if hit:
        name = min(hit, key=lambda n: hit[n])
        return name, f"reached the target first, at {hit[name]:g}"
    accuracy = {name: a for name, records in logs.items() if (a := _last(records, ("test_accuracy",))) is not None}
    if accuracy:
        name = max(accuracy, key=lambda n: accuracy[n])
        return name, f"the highest final test accuracy, {accuracy[name]:.4f}"
    loss = {name: v for name, records in logs.items()
            if (v := _last(records, ("test_loss", "train_loss", "loss"))) is not None}
    if loss:
        name = min(loss, key=lambda n: loss[n])
        return name, f"the lowest final loss, {loss[name]:.4g}"
    return None


def _reached_at(records: list[dict[str, Any]]) -> float | None:
    for record in records:
        if record.get("target_reached"):
            step = record.get("round", record.get("step"))
            return float(step) if isinstance(step, (int, float)) else None
    return None


def _last(records: list[dict[str, Any]], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        values = [v for r in records if isinstance(v := r.get(key), (int, float)) and v == v]
        if values:
            return float(values[-1])
    return None


SUMMARY_FILE = "sweep.json"


def write_summary(plan: Plan, varied: list[str], codes: dict[str, int], best: tuple[str, str] | None = None) -> Path:
    """plan.out/sweep.json: written after each run (exit_code null: not run yet), the best at the end."""
    summary = {"command": plan.command, "vary": varied, "set": plan.overrides,
               "runs": [{"name": m.name, "values": list(m.values), "exit_code": codes.get(m.name)}
                        for m in plan.members],
               "best": {"name": best[0], "why": best[1]} if best else None}
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / SUMMARY_FILE
    atomic_write_bytes(path, lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode("utf-8")))
    return path
