"""Secure aggregation across the network: the server half of one round (`SecAggServer`) and what each selected
client must fetch next. The messages are those of `plait.federated.secagg.messages`, in their byte encoding.

    ADVERTISE_KEYS  every selected client is asked for its keys (an empty SECAGG message); it sends AdvertiseKeys
    SHARE_KEYS      each one that did gets its KeysBroadcast and answers with EncryptedShares
    COLLECT_MASKED  each one that shared gets its SharesForward, then its TRAIN task; it sends its MaskedInput
    UNMASK          each survivor gets its UnmaskRequest and answers with UnmaskShares; the server unmasks the sum

Each stage ends when every client it waits on answered or was dropped (heartbeat lost, round deadline), the
masked one also when `target` inputs are in. A client dropped after sharing keys is a dropout of the protocol:
the survivors' shares of its mask key remove its pair masks from the sum.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

from plait.federated.secagg import messages
from plait.federated.secagg.aggregator import round_server
from plait.federated.secagg.messages import MaskedInput
from plait.federated.secagg.protocol import SecAggError
from plait.federated.secagg.server import SecureSum
from plait.federated.strategy import StrategyConfig

TRAIN = object()   # outbox marker: the round's training task (weights and plan)
ADVERTISE = b""    # outbox marker: an empty SECAGG message asks for the round's keys

# wait(pending, enough) returns once `pending()` is empty (answered or dropped) or `enough()` holds
Waiter = Callable[[Callable[[], set[int]], Callable[[], bool]], Awaitable[None]]


class SecAggRound:
    def __init__(self, strategy: StrategyConfig, numel: int, selected: list[int], *, seed: int, round_idx: int):
        self.server = round_server(strategy.secagg, numel, selected, weighting=strategy.weighting, seed=seed,
                                   round_id=round_idx)
        self.outbox: dict[int, deque] = {}
        self.bytes_up = self.bytes_down = 0

    @property
    def stage(self) -> str:
        return self.server.state.stage.name

    def _post(self, out: dict[int, object], *, then_train: bool = False) -> None:
        for cid, msg in out.items():
            items = self.outbox.setdefault(cid, deque())
            items.append(ADVERTISE if msg is None else messages.encode(msg))
            if then_train:
                items.append(TRAIN)

    def next_item(self, cid: int):
        items = self.outbox.get(cid)
        return items[0] if items else None

    def sent(self, cid: int, item) -> None:
        """A secure-aggregation message went out (the TRAIN task stays until the masked input arrives)."""
        items = self.outbox.get(cid)
        if items and items[0] is item and item is not TRAIN:
            items.popleft()
            self.bytes_down += len(item)

    def drop(self, cid: int) -> None:
        self.outbox.pop(cid, None)

    def receive(self, cid: int, data: bytes):
        """Decode and apply one client message; ValueError / SecAggError name what was wrong."""
        msg = messages.decode(data)
        if getattr(msg, "client_id", cid) != cid:
            raise SecAggError(f"secagg: a {type(msg).__name__} naming client {msg.client_id} sent by client {cid}")
        self.server.receive(msg)
        self.bytes_up += len(data)
        if isinstance(msg, MaskedInput):
            self.outbox.pop(cid, None)
        return msg

    async def run(self, selected: list[int], target: int, wait: Waiter, gone: set[int]) -> SecureSum:
        """The four stages; raises SecAggError when too few clients are left to go on."""
        st, server = self.server.state, self.server
        self._post(dict.fromkeys(selected))
        await wait(lambda: set(selected) - set(st.public_keys) - gone, lambda: False)
        broadcast = server.broadcast_keys()
        self._post(broadcast)
        await wait(lambda: set(broadcast) - st.shared - gone, lambda: False)
        forwards = server.forward_shares()
        self._post(forwards, then_train=True)
        await wait(lambda: set(forwards) - st.masked - gone, lambda: len(st.masked) >= target)
        for cid in list(self.outbox):  # clients still training past the target are dropouts of this round
            self.drop(cid)
        requests = server.request_unmask()
        self._post(requests)
        await wait(lambda: set(requests) - set(st.responses) - gone, lambda: False)
        self.outbox.clear()
        return server.finish()
