"""What makes a parameter server lose nothing when killed: its checkpoint (the shard's state, pending BSP sums
included, written atomically) and, between two checkpoints, the journal replayed after it (journal.py). A mixin of
server.ParameterServer, apart from the event loop so that each holds one job."""

from __future__ import annotations

import time
from collections.abc import Callable

from plait.ps.checkpoint import ServerSnapshot, ShardState, save_shards
from plait.ps.consistency import ClockTable
from plait.ps.journal import COMPACT_AFTER_SHARDS, COMPACT_FLOOR, Journal
from plait.ps.replication import Change, Replica
from plait.ps.server_config import ServerConfig, Slot
from plait.ps.wire import Header


class Durable:
    # Owned by the server (server.ParameterServer.__init__); read and changed here.
    config: ServerConfig
    clocks: ClockTable
    shards: dict[Slot, ShardState]
    sums: dict[Slot, dict[int, list]]
    updates: int
    updates_at_checkpoint: int
    journal: Journal | None
    diverged: dict | None
    replica: Replica | None
    checkpoint_written = False  # by this process, or restored: a restart will not come back empty

    # Methods of the server (its event log) and of replication.ReplicaHandlers (one change applied), declared only.
    _event: Callable[..., None]
    _apply_change: Callable[[Change, Header, memoryview | bytes | None], None]
    _complete_clocks: Callable[[Slot], None]

    def _restore(self, snapshot: ServerSnapshot) -> int:
        """Take a checkpoint's state; returns the last journal record it holds."""
        self.shards, self.sums = snapshot.shards, snapshot.sums
        for slot, shard in self.shards.items():
            self.clocks.add_key(slot, shard.clocks)
        # A crash mid-run keeps who had finished (nobody waits for them); a checkpoint where every worker had
        # finished is a completed job being resumed for more steps: every worker is expected again, as at a start.
        if len(snapshot.finished) < self.config.num_workers:
            for worker in snapshot.finished:
                self.clocks.finish(worker)
        self.updates = self.updates_at_checkpoint = snapshot.updates
        self.checkpoint_written = True
        self._event("restored", pieces=len(self.shards), updates=self.updates)
        return snapshot.journal_seq

    def _replay_journal(self, after: int) -> None:
        """The changes made since the checkpoint (all of them, without one), then a checkpoint holding them."""
        assert self.journal is not None
        replayed = 0
        for header, payload in self.journal.records():
            if header.req > after:
                self._apply_change(Change(header.extra), header, payload)
                replayed += 1
        if replayed:
            # A kill between a clock's last push and its COMPLETE record leaves that clock's sum pending: apply it
            # now, as that push's own progress would have. Else a pull at that clock, ready by the clocks alone,
            # would be answered without the clock's update.
            for slot in list(self.shards):
                self._complete_clocks(slot)
            self._event("replayed", records=replayed, pieces=len(self.shards), updates=self.updates)
            self.checkpoint()
        else:  # every record on disk is one the checkpoint holds: the journal starts over after its last
            self.journal.checkpointed(after)

    def _snapshot(self) -> ServerSnapshot:
        for slot, shard in self.shards.items():
            shard.clocks = list(self.clocks.clocks[slot])
        return ServerSnapshot(self.shards, sorted(self.clocks.finished), self.updates, self.sums,
                              self.journal.seq if self.journal is not None else 0)

    def checkpoint(self, last: bool = False) -> None:
        """Write the shard's state; `last`: the server stops after it, so its journal's file is truncated too."""
        if self.diverged is not None:  # the file on disk is the last good state: keep it for --resume
            self._event("checkpoint_refused", reason="weights not finite", **self.diverged)
            return
        started = time.perf_counter()
        save_shards(self.config.checkpoint_path, self._snapshot())
        if self.journal is not None:
            # the checkpoint holds every record (and says so: a kill before this is fine)
            self.journal.checkpointed(self.journal.seq)
            if last:
                self.journal.release()
        self.updates_at_checkpoint = self.updates
        self.checkpoint_written = True
        self._event("checkpoint", updates=self.updates, seconds=time.perf_counter() - started)

    def _checkpoint_if_due(self) -> None:
        # `updates` counts piece updates: with P pieces, P of them are one update of the whole shard.
        every = self.config.checkpoint_every * max(1, len(self.shards))
        due = every and self.updates - self.updates_at_checkpoint >= every
        # a journal grown past a multiple of the shard is folded into a checkpoint, so its file stays bounded
        # (the shard's size is summed only once the journal passes the floor, not on every push)
        full = (self.journal is not None and self.journal.bytes > COMPACT_FLOOR and self.journal.bytes
                > COMPACT_AFTER_SHARDS * sum(shard.param.nbytes for shard in self.shards.values()))
        # without journal or backup (sync.journal = false), the first update checkpoints the pieces the seeder
        # created: a server killed after it comes back with them, not empty
        unprotected = (self.journal is None and self.replica is None and not self.checkpoint_written
                       and bool(self.shards))
        if (due or full or unprotected) and self.diverged is None:
            self.checkpoint()

