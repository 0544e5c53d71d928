"""The canonical metric names of a run's metrics.jsonl, with the older names they replace, and their units.

This table is where the names are decided. The readers (`plait plot`, `plait compare`, the FL dashboard) pass every
record through `canonical_records`, so that old and new run directories read alike. Every writer uses the canonical
names, with `lr` and `time` (Unix time) in every record: the federated round loop, the gossip runner and the
network server; data parallel and pipeline (`train_loss`, `bytes_up`/`bytes_down` summed over ranks,
`samples_per_s`, `test_accuracy`/`test_loss` when evaluated); the parameter server's evaluator and workers. The
aliases stay here only so that run directories written before the switch still read.

Older names and what they become:

    accuracy                    -> test_accuracy   (every plane evaluates on the central test set)
    loss                        -> test_loss       in federated and parameter-server logs (the evaluation's loss),
                                -> train_loss      in data-parallel and pipeline logs (the training step's loss)
    bytes_sent, bytes_recv      -> bytes_up, bytes_down  (data parallel logs a list per rank: summed over ranks)
    wall                        -> time            (the parameter-server launcher's Unix time)

Derived by the readers when a log lacks them: cumulative_bytes_up, cumulative_bytes_down (running sums).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FEDERATED, DATA_PARALLEL, PIPELINE, PARAMETER_SERVER = "federated", "data parallel", "pipeline", "parameter server"


@dataclass(frozen=True, slots=True)
class MetricName:
    name: str                 # canonical: what a log should call it
    label: str                # axis label, with the unit after scaling
    scale: float = 1.0        # logged value × scale = the value in `label`'s unit


METRICS = {m.name: m for m in (
    MetricName("test_accuracy", "test accuracy (%)", 100.0),
    MetricName("test_loss", "test loss"),
    MetricName("test_top3_accuracy", "top-3 test accuracy (%)", 100.0),  # the target among the 3 likeliest
    MetricName("train_loss", "training loss"),
    MetricName("fed_accuracy", "federated accuracy on clients' data (%)", 100.0),
    MetricName("fed_loss", "federated loss on clients' data"),
    MetricName("bytes_up", "uploaded per record (MB)", 1e-6),
    MetricName("bytes_down", "downloaded per record (MB)", 1e-6),
    MetricName("cumulative_bytes_up", "uploaded so far (MB)", 1e-6),
    MetricName("cumulative_bytes_down", "downloaded so far (MB)", 1e-6),
    MetricName("epsilon", "ε (privacy spent)"),
    MetricName("participants", "clients"),
    MetricName("dropped", "clients"),
    MetricName("selected", "clients"),
    MetricName("samples_per_s", "throughput (samples/s)"),
    MetricName("lr", "learning rate"),
    MetricName("elapsed_s", "elapsed time (s)"),
    MetricName("sim_clock_h", "simulated time (h)"),
    MetricName("time", "Unix time (s)"),
    MetricName("loss", "loss (plane unknown)"),  # a log whose plane is unknown: test or training loss
)}

# Older name -> canonical name, in every plane; PLANE_ALIASES override it where a plane meant something else.
ALIASES = {"accuracy": "test_accuracy", "loss": "test_loss", "bytes_sent": "bytes_up", "bytes_recv": "bytes_down",
           "wall": "time"}
PLANE_ALIASES: dict[str | None, dict[str, str]] = {
    DATA_PARALLEL: {"loss": "train_loss"},
    PIPELINE: {"loss": "train_loss"},
    None: {"loss": "loss"},  # no config to tell: say "loss", not a guess
}
CUMULATIVE = {"bytes_up": "cumulative_bytes_up", "bytes_down": "cumulative_bytes_down"}


def plane_of(config: dict[str, Any], records: Sequence[dict[str, Any]] = ()) -> str | None:
    """The plane that wrote a run, from its config.toml tables (or, without one, from its records)."""
    parallel, sync = config.get("parallel", {}), config.get("sync", {})
    if "fl" in config:
        return FEDERATED
    if isinstance(parallel, dict) and parallel.get("mode") in ("model", "pipeline"):
        return PIPELINE
    if isinstance(sync, dict) and sync.get("kind") == "ps":
        return PARAMETER_SERVER
    if "parallel" in config or "sync" in config or "train" in config:
        return DATA_PARALLEL
    if any("round" in r for r in records):
        return FEDERATED  # only the federated planes count rounds
    if any(isinstance(r.get("bytes_sent"), list) for r in records):
        return DATA_PARALLEL
    return None


def _value(value: Any) -> Any:
    """A per-rank list (data parallel) becomes its sum over ranks."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return sum(value)
    return value


def canonical_records(records: list[dict[str, Any]], plane: str | None) -> list[dict[str, Any]]:
    """The records under canonical names (a canonical key a record already has wins over its alias), with the
    cumulative byte counts added where the log has per-record bytes but no running sum."""
    aliases = {**ALIASES, **PLANE_ALIASES.get(plane, {})}
    totals = dict.fromkeys(CUMULATIVE, 0.0)
    out = []
    for record in records:
        renamed: dict[str, Any] = {}
        for key, value in record.items():
            name = aliases.get(key, key)
            if name != key and name in record:
                continue  # the record has the canonical key too: it wins
            renamed[name] = _value(value)
        for key, total_key in CUMULATIVE.items():
            value = renamed.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] += value
                renamed.setdefault(total_key, totals[key])
        out.append(renamed)
    return out
