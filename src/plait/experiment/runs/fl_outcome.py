"""What `plait run` says when a federated run ends, read from its log: the final figure the task has (accuracy, else
loss), why it stopped early (target reached, privacy budget spent), the privacy spent, and the rounds that changed
nothing (skipped: quorum not reached, updates refused, a divergence skipped) — a run that trained no round must not
read as a finished one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from plait.experiment.rundir import RunDir
from plait.runtime.metrics_log import read_metrics


def _rounds(n: int) -> str:
    return f"{n} round{'s' if n != 1 else ''}"


def _why_skipped(record: dict[str, Any]) -> str:
    if record.get("diverged"):
        return "diverged"
    if record.get("stop"):
        return "privacy budget spent"
    if record.get("aggregation_error"):
        return "aggregation failed"
    if record.get("refused"):
        return "updates refused"
    if record.get("selected", 0) == 0:
        return "too few eligible clients"
    return "quorum not reached"


def outcome_lines(run_dir: Path, final: dict[str, Any], rounds: int, seconds: float) -> list[str]:
    """Lines of rich markup: the final figure, then what a reader of that figure must know."""
    lines = []
    if "test_accuracy" in final:
        lines.append(f"final test accuracy: [bold]{final['test_accuracy']:.4f}[/] after {_rounds(rounds)} "
                     f"({seconds:.1f} s)")
    elif "test_loss" in final:
        lines.append(f"final test loss: [bold]{final['test_loss']:.4f}[/] after {_rounds(rounds)} ({seconds:.1f} s)")
    elif "fed_accuracy" in final:
        lines.append(f"final accuracy on the clients' held-out data: [bold]{final['fed_accuracy']:.4f}[/] after "
                     f"{_rounds(rounds)} ({seconds:.1f} s)")
    if final.get("target_reached"):
        lines.append(f"target accuracy reached at round {final['round']}")
    elif final.get("stop") and final.get("skipped"):
        lines.append(f"the privacy budget was spent: the run stopped at round {final['round']}")
    if "epsilon" in final:
        lines.append(f"privacy spent: ε = {final['epsilon']:.3g}")
    records = [r for r in read_metrics(RunDir(run_dir).metrics_path) if "round" in r]
    skipped = Counter(_why_skipped(r) for r in records if r.get("skipped"))
    if skipped:
        said = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        changed = "; the model never trained" if sum(skipped.values()) == len(records) else ""
        lines.append(f"[yellow]warning:[/] {sum(skipped.values())} of {_rounds(len(records))} changed nothing "
                     f"({said}){changed}")
    return lines
