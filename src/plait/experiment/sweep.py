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
accuracy, else the lowest final loss. `--resume` goes on with a sweep: a run whose directory holds a checkpoint
resumes, the others start.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from plait.experiment.planes import config_class
from plait.experiment.rundir import RunDir
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
        listed = [v.strip() for v in values.split(",")]
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
    return out


def command_of(raw: dict[str, Any]) -> Command:
    """`run` for a federated simulation's config (it has an [fl] table), `train` for a cluster's."""
    return "run" if "fl" in raw else "train"


@dataclass(slots=True)
class Plan:
    command: Command
    root: Path
    base: str
    members: list[Member]


def plan_sweep(config: Path, vary: list[str], overrides: list[str], resume: bool) -> Plan:
    """The sweep's runs, each one's config read and checked as its command will (a refused value stops the sweep
    before anything runs), and, without `resume`, none of their directories holding a run already."""
    raw = apply_overrides(load_toml(config), overrides)
    command = command_of(raw)
    varied = parse_vary(vary)
    for key, _ in varied:
        if key in ("run.name", "run.root"):
            raise ConfigError(f"--vary {key}: a sweep's runs are named for their values, side by side in run.root")
    first: Any = typed(config_class(command, raw), raw)
    run = first.run
    planned = members(run.name, varied)
    for member in planned:
        member_raw = apply_overrides(raw, list(member.values))
        typed(config_class(command, member_raw), member_raw)
    root = Path(run.root)
    if not resume:
        held = [m.name for m in planned if _holds_a_run(root / m.name)]
        if held:
            raise FileExistsError(f"{root} already holds runs of this sweep ({', '.join(held)}): --resume to go on "
                                  "with it, or another run.name")
    return Plan(command, root, run.name, planned)


def _holds_a_run(path: Path) -> bool:
    run = RunDir(path)
    return run.checkpoint_path.exists() or run.metrics_path.exists()


def member_argv(plan: Plan, config: Path, member: Member, overrides: list[str], nproc: int, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "plait.cli", plan.command, str(config)]
    if plan.command == "train":
        argv += ["--nproc", str(nproc)]
    if resume and RunDir(plan.root / member.name).checkpoint_path.exists():
        argv.append("--resume")
    for item in [*overrides, *member.values, f"run.name={member.name}"]:
        argv += ["--set", item]
    return argv


def run_member(argv: list[str], echo: Callable[[str], None] | None) -> int:
    """The member's command; its output to this terminal, or, with `echo` (off a terminal), line by line to it."""
    if echo is None:
        return subprocess.run(argv, check=False).returncode
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        return proc.wait()


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


def write_summary(path: Path, plan: Plan, varied: list[str], codes: dict[str, int],
                  best: tuple[str, str] | None) -> Path:
    summary = {"command": plan.command, "vary": varied,
               "runs": [{"name": m.name, "values": list(m.values), "exit_code": codes.get(m.name)}
                        for m in plan.members],
               "best": {"name": best[0], "why": best[1]} if best else None}
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path
