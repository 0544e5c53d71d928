"""One network round's bookkeeping: who was selected, who reported, who was dropped or refused, the running
aggregate (or, for a federated-evaluation round, each client's figures).

Updates are folded into the aggregator as they arrive (the server never holds all of them); the round closes when
`target` clients reported, when every selected client still alive reported or was refused, or at the deadline. A
client whose update is refused has ended its task for the round: it is not sent the task again.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from plait.federated.client_update import Update
from plait.federated.plan import TrainingPlan
from plait.federated.round_loop import Evaluation
from plait.federated.strategy import Aggregator


@dataclass(slots=True)
class ClientInfo:
    session: str
    properties: dict[str, bool]
    num_examples: int
    last_seen: float              # monotonic time of the last authenticated request
    told_done: bool = False
    # counted for the status page (since the server started; a re-registration keeps them)
    rounds: int = 0               # updates (or masked inputs) accepted: the rounds it took part in
    evaluations: int = 0          # federated evaluations accepted
    refusals: dict[str, int] = field(default_factory=dict)  # reason -> requests of its session refused
    last_refusal: str = ""        # the last refusal's message


@dataclass(slots=True)
class RoundState:
    idx: int
    selected: list[int]
    target: int
    plans: dict[int, TrainingPlan]
    payload: list[bytes]          # the global weights as serialized data chunks, made once, sent to every client
    aggregator: Aggregator | None
    task_ids: dict[int, str] = field(default_factory=dict)
    reported: list[int] = field(default_factory=list)
    gone: set[int] = field(default_factory=set)       # heartbeat lost or deadline passed: dropped
    lost: int = 0                                     # secure aggregation: dropped when their heartbeat stopped
    late: int = 0                                     # surplus reports after the target was reached
    loss_sum: float = 0.0
    examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    closed: bool = False
    secagg: Any = None            # SecAggRound when fl.strategy.name = "secagg": updates arrive masked
    evaluation: bool = False      # a federated-evaluation round: clients send figures, not updates
    evaluations: dict[int, Evaluation] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)   # client -> why its update was refused
    changed: asyncio.Event = field(default_factory=asyncio.Event)     # set on every client message that counts

    def __post_init__(self) -> None:
        self.task_ids = {cid: secrets.token_hex(8) for cid in self.selected}

    def waiting_on(self, cid: int) -> bool:
        """True while `cid` holds a task of this round that may still be reported."""
        if self.closed or cid not in self.task_ids or cid in self.gone:
            return False
        if self.secagg is not None:  # the protocol decides what this client fetches next (even after reporting)
            return self.secagg.next_item(cid) is not None
        return cid not in self.reported

    def outstanding(self) -> list[int]:
        return [cid for cid in self.selected if cid not in self.gone and cid not in self.reported]

    def add(self, cid: int, update: Update, num_bytes: int) -> None:
        if self.aggregator is not None:  # None under secure aggregation: the masked input went to the protocol
            self.aggregator.add(cid, update)
        self.reported.append(cid)
        self.changed.set()
        self.loss_sum += update.metrics.get("train_loss", 0.0) * update.num_examples
        self.examples += update.num_examples
        self.bytes_up += num_bytes

    def add_evaluation(self, evaluation: Evaluation) -> None:
        self.evaluations[evaluation.client_id] = evaluation
        self.reported.append(evaluation.client_id)
        self.changed.set()

    def refuse(self, cid: int, reason: str) -> None:
        """The client's update was refused: its task for this round ends (counted once, never re-sent)."""
        self.refused[cid] = reason
        self.gone.add(cid)
        self.changed.set()

    def summary(self) -> dict[str, Any]:
        """The round in progress, as the status page shows it."""
        return {"round": self.idx, "selected": self.selected, "target": self.target,
                "finished": sorted(self.reported), "dropped": sorted(self.gone), "refused": dict(self.refused),
                "closed": self.closed, "kind": "evaluation" if self.evaluation else "training",
                "secagg_stage": self.secagg.stage if self.secagg is not None else None}
