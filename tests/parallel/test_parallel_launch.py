"""`plait train --nproc N` spawns its ranks on this host only: they meet through a store file (no rendezvous port),
and gloo binds to loopback, so no socket of a rank listens or talks beyond 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from plait.parallel.launch import spawn_ranks

IPV4_LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian hex)
IPV6_LOOPBACKS = {"00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # ::1, ::ffff:127.0.0.1
LISTEN = "0A"


def _own_tcp_sockets() -> list[tuple[str, str, str]]:
    """(local address, remote address, state) of every TCP socket this process holds, from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[9] in inodes:
                found.append((fields[1].split(":")[0], fields[2].split(":")[0], fields[3]))
    return found


def _sockets_after_a_collective(rank: int, world_size: int) -> list[tuple[str, str, str]]:
    total = torch.ones(1)
    dist.all_reduce(total)  # gloo has connected its pairs by now
    return _own_tcp_sockets()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_spawned_ranks_listen_and_connect_on_loopback_only():
    ranks = spawn_ranks(_sockets_after_a_collective, 2, timeout_s=60)
    for sockets in ranks:
        assert any(state == LISTEN for _, _, state in sockets)  # gloo's own listener is among them
        for local, remote, state in sockets:
            assert local == IPV4_LOOPBACK or local in IPV6_LOOPBACKS, (local, state)
            if state != LISTEN:
                assert remote == IPV4_LOOPBACK or remote in IPV6_LOOPBACKS, (remote, state)
