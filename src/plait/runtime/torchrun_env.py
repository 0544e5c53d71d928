"""torchrun's environment, shared by the planes that run under it: whether this process is a rank torchrun
started, and the key-value store its ranks meet through (MASTER_ADDR:MASTER_PORT; see docs/security.md).

The data-parallel and pipeline planes build their process group on this store (parallel/launch.py); the
parameter-server ranks need no process group, only the store, to hand each other endpoints and states
(ps/torchrun_roles.py)."""

from __future__ import annotations

import os
from datetime import timedelta

# torch.distributed re-exports these without declaring them (mypy --strict): the module that defines them
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (its env:// rendezvous is set)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def torchrun_store(timeout_s: float = 120.0) -> tuple[Store, int, int]:
    """(the store of this attempt, this rank, the world size) from torchrun's environment. The store's keys are
    this attempt's only (`attempt_prefix`); a `get` or `wait` on it gives up after `timeout_s`."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"torchrun's environment is incomplete: missing {missing}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s),
                          multi_tenant=not agent_store)
    return PrefixStore(attempt_prefix(agent_store), store), rank, world_size


def attempt_prefix(agent_store: bool) -> str:
    """The store keys of this attempt of the group.

    Without torchrun's agent store, rank 0 hosts the store, so each attempt starts with an empty one. The agent store
    outlives the workers: keys left by a dead attempt (ranks' old addresses) would make the new one connect to dead
    sockets, so each attempt gets its own prefix, named by the restart count. With one agent that count is the
    attempt's; with several, an agent restarts its workers without counting when another agent's workers failed,
    so the counts differ across nodes and the ranks would never meet: refuse that case at start, with the fix."""
    if not agent_store:
        return "plait"
    agents = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if agents > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise RuntimeError(
            f"torchrun restarts ({os.environ.get('TORCHELASTIC_MAX_RESTARTS')}) across {agents} agents need a fresh "
            "store for each attempt: start every agent with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment "
            "(rank 0 then hosts the store of each attempt), or use --max-restarts 0")
    return f"plait/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
