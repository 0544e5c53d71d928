"""`plait sweep CONFIG --vary KEY=V1,V2,...`: a run per combination of the varied settings, each the command a user
would type for the config, then the runs compared and the best named (plait/experiment/sweep.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plait.cli.output import fail, say
from plait.cli.parsing import Commands, add_command, add_overrides
from plait.settings.config import ConfigError


def sweep(args: argparse.Namespace) -> None:
    """Run CONFIG once per combination of the --vary values (plait run, or plait train --nproc N for a cluster's
    config), each in its own run directory NAME-<key><value>..., then compare them and name the best: the fewest
    rounds to the target, else the highest final test accuracy, else the lowest final loss."""
    from plait.experiment.compare import compare_runs
    from plait.experiment.sweep import best_member, member_argv, next_step, plan_sweep, run_member, write_summary

    try:
        plan = plan_sweep(args.config, args.vary, args.set, args.resume, args.nproc)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        fail(str(err))
    echo = None if sys.stdout.isatty() else (lambda line: print(line, flush=True))
    codes: dict[str, int] = {}
    for index, member in enumerate(plan.members, 1):
        step = next_step(plan, member, args.resume)
        where = f"{', '.join(member.values)} → {plan.root / member.name}"
        if step in ("finished", "stopped early"):
            codes[member.name] = plan.done.get(member.name, 0 if step == "finished" else 1)
            said = "finished: not run again" if step == "finished" else \
                "stopped before its first checkpoint: not run again (delete its directory to run it again)"
            say(f"[bold]sweep {index}/{len(plan.members)}:[/] {where}: {said}")
            continue
        say(f"[bold]sweep {index}/{len(plan.members)}:[/] {where}" + (" (resumed)" if step == "resume" else ""))
        codes[member.name] = run_member(member_argv(plan, args.config, member, args.nproc, step == "resume"), echo)
        write_summary(plan, args.vary, codes)  # after each run: a stopped sweep says which ran
        if codes[member.name] == 130:  # Ctrl-C: the run stopped as it would alone; the sweep stops with it
            fail(f"sweep stopped at {member.name}: --resume goes on with it", code=130)
    done = [m.name for m in plan.members if codes.get(m.name) == 0]
    if len(done) >= 2:
        from plait.cli.output import show_comparison

        show_comparison(compare_runs([plan.root / name for name in done], plan.out))
    best = best_member(done, plan.root)
    say(f"written: {write_summary(plan, args.vary, codes, best)}")
    if best is not None:
        say(f"best: {best[0]} ({best[1]})")
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        fail(f"{len(failed)} of {len(codes)} runs failed ({', '.join(f'{n}: exit {codes[n]}' for n in failed)}); "
             "their output is above", code=1)


def add_to(commands: Commands) -> None:
    command = add_command(commands, "sweep", sweep)
    command.add_argument("config", type=Path, help="a federated run's or a cluster's TOML config")
    command.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                         help="a setting and its values, e.g. --vary fl.plan.lr=0.05,0.1,0.2 (repeat for a grid)")
    command.add_argument("--nproc", type=int, default=1, help="a cluster's config: ranks (workers) each run spawns")
    command.add_argument("--resume", action="store_true",
                         help="go on with a sweep: runs with a checkpoint resume, the others start")
    add_overrides(command)
