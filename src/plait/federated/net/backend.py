"""Real clients over gRPC as a backend of the one round loop (`round_loop.py`).

The round loop runs in a thread of its own (the driver's); the gRPC service runs on the server's asyncio event loop.
Each backend call hands a coroutine to that event loop and waits for its result, so the loop's evaluation and
checkpoints never stall the service, and the service's state is only ever touched from its own event loop.

    candidates  wait until `net.wait_for_clients` are connected (or the quorum, after `net.wait_timeout_s`); the
                connected clients and the properties they reported
    collect     post the round (weights serialized once, a plan per client); clients long-polling for a task get it
                at once; fold updates into the aggregator as they arrive; close at the target, when every selected
                client still alive reported (or was refused), or at `net.round_timeout_s`; with secure aggregation
                run the protocol's stages instead and return the unmasked mean
    evaluate    post EVALUATE tasks to the chosen clients, who evaluate the weights on their own held-out data
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from plait.federated.net.round_state import RoundState
from plait.federated.net.secagg_round import SecAggRound
from plait.federated.net.wire import tensor_data_chunks
from plait.federated.round_loop import Collected, Evaluation, RoundTasks
from plait.federated.secagg.aggregator import weighted_mean
from plait.federated.secagg.protocol import SecAggError

if TYPE_CHECKING:
    from plait.federated.net.server import NetServer

log = logging.getLogger("plait.fl.server")
T = TypeVar("T")


class NetBackend:
    aggregates_secagg = True  # the protocol runs between the real clients and this server

    def __init__(self, server: NetServer, event_loop: asyncio.AbstractEventLoop):
        self.server, self.event_loop = server, event_loop
        self.connected = 0
        self.patience_spent = False  # a missing client was waited for once: later rounds go on with the quorum

    def _on_service_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.event_loop).result()

    def candidates(self, round_idx: int) -> dict[int, dict[str, bool]]:
        return self._on_service_loop(self._wait_for_clients())

    def declared_examples(self, client_ids: list[int]) -> dict[int, int]:
        return self._on_service_loop(self._declared(client_ids))

    def collect(self, tasks: RoundTasks, record: dict[str, Any]) -> Collected:
        return self._on_service_loop(self._collect(tasks, record))

    def evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> list[Evaluation]:
        return self._on_service_loop(self._evaluate(params, client_ids, round_idx))

    def close(self) -> None:
        pass  # the service outlives the rounds: it tells the clients the run is done, then stops

    # ---- on the service's event loop ------------------------------------------------------------------------
    async def _wait_for_clients(self) -> dict[int, dict[str, bool]]:
        """Until `net.wait_for_clients` are connected, or for `net.wait_timeout_s` once the quorum
        (`fl.min_clients`) is: a server with fewer clients than its quorum waits for them, burning no round. The
        patience is spent once: a client that died is not waited for again every round, until the full count is
        back."""
        net, fl = self.server.config.net, self.server.config.fl
        wanted, quorum = net.wait_for_clients or fl.min_clients, fl.min_clients
        patience_until = None
        self.server.phase = f"waiting for {wanted} clients"
        while True:
            alive = self.server.alive()
            if len(alive) >= wanted:
                self.patience_spent = False
                break
            if len(alive) >= quorum:
                if self.patience_spent:
                    break
                patience_until = patience_until or time.monotonic() + net.wait_timeout_s
                if time.monotonic() >= patience_until:
                    log.warning("%d of %d clients connected after %.0f s: going on with them (and not waiting again "
                                "until all are back)", len(alive), wanted, net.wait_timeout_s)
                    self.patience_spent = True
                    break
            await asyncio.sleep(0.05)
        self.connected = len(alive)
        return {cid: dict(info.properties) for cid, info in alive.items()}

    async def _declared(self, client_ids: list[int]) -> dict[int, int]:
        """What the clients declared when they registered (their reports may not exceed it: update_checks.py)."""
        clients = self.server.clients
        return {cid: clients[cid].num_examples for cid in client_ids if cid in clients}

    def _post(self, rnd: RoundState) -> None:
        self.server.open_round(rnd)

    async def _collect(self, tasks: RoundTasks, record: dict[str, Any]) -> Collected:
        server, fl = self.server, self.server.config.fl
        record["connected"] = self.connected
        # The weights as serialized data chunks, made once (one copy, a snapshot) and streamed to every client.
        payload = list(tensor_data_chunks(tasks.params, server.config.net.chunk_bytes))
        secagg = None
        if tasks.aggregator is None:  # secure aggregation: the protocol's server half; the clients run theirs
            try:
                secagg = SecAggRound(fl.strategy, server.numel, tasks.selected, seed=server.config.run.seed,
                                     round_idx=tasks.round_idx)
            except SecAggError as err:  # e.g. fewer than 2 clients selected
                return Collected(participants=0, dropped=0, error=str(err))
        rnd = RoundState(tasks.round_idx, tasks.selected, tasks.target, tasks.plans, payload, tasks.aggregator,
                         secagg=secagg)
        self._post(rnd)
        server.phase = f"round {tasks.round_idx}: training"
        got = Collected(participants=0, dropped=0)
        if secagg is not None:
            got.mean, got.error = await self._collect_secagg(rnd, record)
            got.participants = record.pop("participants", len(rnd.reported))
            record.update(bytes_down=rnd.bytes_down + secagg.bytes_down, bytes_up=secagg.bytes_up)
        else:
            await self._collect_updates(rnd)
            got.participants = len(rnd.reported)
            record.update(bytes_down=rnd.bytes_down, bytes_up=rnd.bytes_up)
        # programs sent since the last record (net.ship_program: once per client and run) count as traffic down
        record["bytes_down"] += server.shipped_bytes_sent
        server.shipped_bytes_sent = 0
        got.dropped = len(tasks.selected) - got.participants
        got.loss_sum, got.examples = rnd.loss_sum, rnd.examples
        record.update(lost=rnd.lost, late=rnd.late, refused=len(rnd.refused))
        record.update({f"rejected_{reason}": n for reason, n in server.round_rejected.items()})
        server.round_rejected.clear()
        return got

    def _drop_silent(self, rnd: RoundState, waiting: list[int] | set[int], stage: str) -> None:
        """Drop the clients among `waiting` whose heartbeat stopped, now rather than at the deadline."""
        alive = self.server.alive()
        for cid in sorted(waiting):
            if cid not in alive:
                rnd.gone.add(cid)
                if rnd.secagg is not None:
                    rnd.secagg.drop(cid)
                rnd.lost += 1
                log.warning("round %d: client %d lost (no heartbeat for %.1f s)%s, dropped", rnd.idx, cid,
                            self.server.config.net.heartbeat_timeout_s, stage)

    async def _collect_updates(self, rnd: RoundState) -> None:
        """Wait for the round's reports (or evaluations) until the target, no one outstanding, or the deadline."""
        deadline = time.monotonic() + self.server.config.net.round_timeout_s
        while len(rnd.reported) < rnd.target:
            self._drop_silent(rnd, rnd.outstanding(), "")
            if not rnd.outstanding():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("round %d: deadline passed, dropping stragglers %s", rnd.idx, rnd.outstanding())
                rnd.gone.update(rnd.outstanding())
                break
            rnd.changed.clear()
            try:
                await asyncio.wait_for(rnd.changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        rnd.closed = True

    async def _wait_stage(self, rnd: RoundState, pending, enough, deadline: float) -> None:
        """Until every client `pending()` names answered or was dropped (heartbeat lost, deadline), or `enough()`."""
        self.server.wake_pollers()  # the stage's messages were just posted: clients holding a poll fetch them now
        while not enough():
            self._drop_silent(rnd, pending(), f" in stage {rnd.secagg.stage}")
            if not pending():
                return
            if time.monotonic() >= deadline:
                log.warning("round %d: deadline passed in stage %s, dropping %s", rnd.idx, rnd.secagg.stage,
                            sorted(pending()))
                for cid in pending():
                    rnd.gone.add(cid)
                    rnd.secagg.drop(cid)
                return
            rnd.changed.clear()
            try:
                await asyncio.wait_for(rnd.changed.wait(), 0.1)
            except TimeoutError:
                pass

    async def _collect_secagg(self, rnd: RoundState, record: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
        """Run the protocol's stages with the selected clients: (the weighted mean, "") or (None, why not)."""
        deadline = time.monotonic() + self.server.config.net.round_timeout_s
        def wait(pending, enough):
            return self._wait_stage(rnd, pending, enough, deadline)
        try:
            outcome = await rnd.secagg.run(rnd.selected, rnd.target, wait, rnd.gone)
            mean = weighted_mean(outcome)
        except SecAggError as err:  # too many dropouts: this round releases nothing
            log.warning("round %d: %s", rnd.idx, err)
            return None, str(err)
        finally:
            rnd.closed = True
        record.update(secagg_dropped=len(outcome.dropped), participants=len(outcome.survivors))
        return mean, ""

    async def _evaluate(self, params: torch.Tensor, client_ids: list[int], round_idx: int) -> list[Evaluation]:
        server = self.server
        payload = list(tensor_data_chunks(params, server.config.net.chunk_bytes))
        rnd = RoundState(round_idx, list(client_ids), len(client_ids), {}, payload, None, evaluation=True)
        self._post(rnd)
        server.phase = f"round {round_idx}: federated evaluation"
        await self._collect_updates(rnd)
        return [rnd.evaluations[cid] for cid in sorted(rnd.evaluations)]
