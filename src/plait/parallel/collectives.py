"""All-reduce (sum, in place) four ways, over one process group, each counting the bytes this rank moves.

- `native`: the backend's own `dist.all_reduce` (gloo / NCCL). The default and the fast path.
- `ring`: reduce-scatter then all-gather around the ring, n−1 steps each; each rank sends 2(n−1)/n·S bytes. Its
  reduce-scatter phase alone (`RingAllReduce.reduce_scatter`) is ZeRO-2's gradient sync.
- `tree`: reduce up a binary tree rooted at rank 0 (children of r are 2r+1, 2r+2), then broadcast down.
- `naive`: every rank sends its whole tensor to every other rank: (n−1)·S bytes sent per rank, n(n−1) messages.

Ring, tree and naive are written over `torch.distributed` point-to-point (isend / irecv) so they can be compared
and taught. Every rank ends with bit-identical results (replicas must not drift): ring and tree compute each
element once and copy it, naive sums the n tensors in rank order on every rank.

`all_reduce_async` returns a handle with `wait()`. Native uses the backend's async work; the point-to-point
algorithms run on one worker thread per instance, in submission order (every rank must issue the same p2p
sequence), so they overlap with whatever the caller does meanwhile (backward, in the trainer).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALGORITHMS = ("native", "ring", "tree", "naive")


@dataclass(slots=True)
class CommStats:
    """Bytes this rank sent and received, and seconds spent inside all-reduce calls (on any thread)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    seconds: float = 0.0
    calls: int = 0

    def snapshot(self) -> tuple[int, int, float, int]:
        return self.bytes_sent, self.bytes_recv, self.seconds, self.calls


class Handle:
    """An all-reduce in flight. `wait()` blocks until it is done and re-raises its error, if any."""

    def __init__(self, wait_fn: Callable[[], None] | None = None):
        self._wait_fn = wait_fn
        self._done = threading.Event()
        self._error: BaseException | None = None  # without wait_fn, a worker thread completes it (_finish)

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()

    def wait(self, timeout_s: float = 300.0) -> None:
        if self._wait_fn is not None:
            self._wait_fn()
            self._wait_fn = None
            return
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"all-reduce did not complete within {timeout_s:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"all-reduce failed on the worker thread: {self._error}") from self._error


class AllReduce:
    """Base: a sum all-reduce over `group`. Subclasses implement `_run(tensor)` (the synchronous algorithm)."""

    name = "base"

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _global(self, group_rank: int) -> int:
        """p2p calls take global ranks; the algorithms think in ranks of the group."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the group, in place. Needs a contiguous tensor."""
        if not tensor.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor")
        start = time.perf_counter()
        if self.world_size > 1 and tensor.numel() > 0:
            self._run(tensor.view(-1))
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1

    def all_reduce_async(self, tensor: torch.Tensor, then: Callable[[], None] | None = None) -> Handle:
        """Start the all-reduce; `then` (e.g. dividing by n) runs once it is done, before `wait()` returns."""
        return self._submit(lambda: self.all_reduce(tensor), tensor.device, then)

    def _submit(self, work: Callable[[], None], device: torch.device, then: Callable[[], None] | None) -> Handle:
        """Queue `work` (a collective on `device`) for the worker thread, in submission order."""
        if self._worker is None:
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve, name=f"plait-{self.name}-allreduce", daemon=True)
            self._worker.start()
        handle = Handle()
        self._queue.put((work, device, then, handle))
        return handle

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, device, then, handle = item
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # the current device is per thread; NCCL p2p uses it
                work()
                if then is not None:
                    then()
                handle._finish()
            except BaseException as err:  # hand the error to whoever waits
                handle._finish(err)

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
            self._worker = None

    def _run(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def _scratch(self, numel: int, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A receive buffer kept between calls: a fresh one would cost page faults on every call."""
        key = (slot, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    # point-to-point helpers that count bytes
    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Post all sends and receives together, then wait for all (no ordering deadlock between pairs)."""
        ops = [dist.P2POp(dist.isend, t, self._global(peer), self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(peer), self.group) for t, peer in recvs]
        if not ops:
            return
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self.stats.bytes_sent += sum(t.numel() * t.element_size() for t, _ in sends)
        self.stats.bytes_recv += sum(t.numel() * t.element_size() for t, _ in recvs)


class NativeAllReduce(AllReduce):
    """The backend's all-reduce. Its internal algorithm is the backend's; bytes are counted as a ring would move
    them (2(n−1)/n·S each way), an estimate."""

    name = "native"

    def _count(self, tensor: torch.Tensor) -> None:
        n = self.world_size
        moved = 2 * (n - 1) * tensor.numel() * tensor.element_size() // n
        self.stats.bytes_sent += moved
        self.stats.bytes_recv += moved
        self.stats.calls += 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
            self._count(tensor)
        self.stats.seconds += time.perf_counter() - start

    def all_reduce_async(self, tensor: torch.Tensor, then: Callable[[], None] | None = None) -> Handle:
        if self.world_size == 1:
            work = None
        else:
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
            self._count(tensor)

        def finish() -> None:
            start = time.perf_counter()
            if work is not None:
                work.wait()
            self.stats.seconds += time.perf_counter() - start  # time blocked; the rest overlapped
            if then is not None:
                then()

        return Handle(finish)


class RingAllReduce(AllReduce):
    """Reduce-scatter then all-gather. Chunk c ends fully reduced on rank (c − 1) mod n after n−1 steps, then
    travels once more around the ring. Sizes not divisible by n give chunks that differ by one element.

    Each chunk travels as segments of `segment_numel` elements, so adding segment k overlaps receiving k+1.
    With 2 ranks this is the same as a direct exchange (each rank sends the other the half it does not reduce),
    so no special case is needed; the all-gather sends from and receives into the output itself (no copies)."""

    name = "ring"
    # 4 MiB of float32. Measured (2 ranks, 1e7 floats, gloo on loopback): 1 MiB segments cost ~15% more CPU than
    # 4 MiB ones (one message per segment, each with its own rendezvous and wake-ups) for no wall-clock gain, and
    # the add a larger segment delays is small (5e5 floats: 0.05 ms). Cutting the all-gather into the
    # reduce-scatter (send segment k onwards as soon as it is reduced) was slower here, not faster.
    segment_numel = 1 << 20

    def _run(self, flat: torch.Tensor) -> None:
        n, rank = self.world_size, self.rank
        right, left = self._global((rank + 1) % n), self._global((rank - 1) % n)
        chunks = list(flat.tensor_split(n))
        self._reduce_scatter_phase(chunks)
        for step in range(n - 1):  # all-gather: received chunks are final, so receive in place
            send_c, recv_c = (rank + 1 - step) % n, (rank - step) % n
            self._step(chunks[send_c], right, chunks[recv_c], left, reduce=False)

    def reduce_scatter(self, chunks: list[torch.Tensor]) -> None:
        """Sum `chunks` over the group, in place, each on its owner only: afterwards chunk r holds the sum on rank r
        (the other chunks hold partial sums). One chunk per rank, of the same sizes on every rank (some may be
        empty). ZeRO-2 reduce-scatters its gradient buckets with this: gloo has no reduce_scatter_tensor."""
        if len(chunks) != self.world_size:
            raise ValueError(f"reduce_scatter needs one chunk per rank ({self.world_size}), got {len(chunks)}")
        start = time.perf_counter()
        if self.world_size > 1:
            n = self.world_size
            self._reduce_scatter_phase([chunks[(c - 1) % n] for c in range(n)])  # the phase leaves chunk c on c−1
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1

    def reduce_scatter_async(self, chunks: list[torch.Tensor], then: Callable[[], None] | None = None) -> Handle:
        """`reduce_scatter` on the worker thread, in order with this instance's all-reduces; `then` runs after it."""
        return self._submit(lambda: self.reduce_scatter(chunks), chunks[0].device, then)

    def _reduce_scatter_phase(self, chunks: list[torch.Tensor]) -> None:
        """n−1 steps, each adding what the left neighbour sends into one chunk: chunk c ends summed on rank c−1."""
        n, rank = self.world_size, self.rank
        right, left = self._global((rank + 1) % n), self._global((rank - 1) % n)
        for step in range(n - 1):
            send_c, recv_c = (rank - step) % n, (rank - step - 1) % n
            self._step(chunks[send_c], right, chunks[recv_c], left, reduce=True)

    def _step(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, reduce: bool) -> None:
        seg = self.segment_numel
        incoming = self._scratch(recv.numel(), recv) if reduce else recv
        # both ends cut a chunk at the same offsets (tensor_split is deterministic), so segments pair up
        sends = [dist.isend(send[i : i + seg], dst, group=self.group) for i in range(0, send.numel(), seg)]
        recvs = [(i, dist.irecv(incoming[i : i + seg], src, group=self.group)) for i in range(0, recv.numel(), seg)]
        for i, work in recvs:
            work.wait()
            if reduce:
                recv[i : i + seg].add_(incoming[i : i + seg])
        for work in sends:
            work.wait()
        self.stats.bytes_sent += send.numel() * send.element_size()
        self.stats.bytes_recv += recv.numel() * recv.element_size()


class TreeAllReduce(AllReduce):
    """Binary tree rooted at rank 0: sum up (children's tensors added in child order), then broadcast down."""

    name = "tree"

    def _run(self, flat: torch.Tensor) -> None:
        n, rank = self.world_size, self.rank
        children = [c for c in (2 * rank + 1, 2 * rank + 2) if c < n]
        parent = (rank - 1) // 2
        if children:
            incoming = [self._scratch(flat.numel(), flat, slot) for slot in range(len(children))]
            self._exchange([], [(buf, child) for buf, child in zip(incoming, children)])
            for buf in incoming:
                flat.add_(buf)
        if rank != 0:
            self._exchange([(flat, parent)], [])
            self._exchange([], [(flat, parent)])  # the total, from the root down
        if children:
            self._exchange([(flat, child) for child in children], [])


class NaiveAllReduce(AllReduce):
    """Every rank sends its whole tensor to every other and sums all n in rank order (identical on every rank)."""

    name = "naive"

    def _run(self, flat: torch.Tensor) -> None:
        n, rank = self.world_size, self.rank
        peers = [p for p in range(n) if p != rank]
        incoming = {p: self._scratch(flat.numel(), flat, p) for p in peers}
        self._exchange([(flat, p) for p in peers], [(incoming[p], p) for p in peers])
        if rank == 0:  # flat already holds x_0
            for p in peers:
                flat.add_(incoming[p])
            return
        mine = self._scratch(flat.numel(), flat, rank)  # keep x_rank while flat becomes the rank-ordered sum
        mine.copy_(flat)
        flat.copy_(incoming[0])
        for p in range(1, n):
            flat.add_(mine if p == rank else incoming[p])


ALLREDUCE_CLASSES: dict[str, type[AllReduce]] = {
    "native": NativeAllReduce, "ring": RingAllReduce, "tree": TreeAllReduce, "naive": NaiveAllReduce}


def make_allreduce(name: str, group: dist.ProcessGroup | None = None) -> AllReduce:
    """The algorithm called `name` over `group`, for code of one's own (a config's `[parallel]` section builds its
    own with `ParallelSection.build_allreduce`)."""
    if name not in ALLREDUCE_CLASSES:
        raise ValueError(f"parallel.allreduce = {name!r} is unknown; choose one of {list(ALGORITHMS)}")
    return ALLREDUCE_CLASSES[name](group)
