"""Process-pool client execution: persistent worker processes, one torch thread each, run `client_update`.

Small models are overhead-bound on one core, so two single-threaded workers on two cores do about twice the
clients per second of one process, as long as a task costs the parent little to send and to take back. Passing
tensors through torch's shared memory costs a file descriptor each, sent over a fresh connection, one after the
other in the parent's task thread: with the global weights, a client's inputs and labels out and its update back,
that starved two workers of 6-step 2NN clients (100 of them: 0.71 s a round, against 0.43 s one after the other in
one process; now 0.37 s, medians of 7 on 2 cores). So nothing per task goes through a descriptor any more:
- the global weights are written once a round into a shared buffer the workers mapped when they started;
- each update comes back in one of a few shared result slots, whose index travels with the task; the parent
  copies it out as it takes the result in order and hands the slot to the next task (a window of tasks in flight);
- a client's tensors are copied into a shared input row that goes with its slot, and the task names where they
  lie. They travelled by value before (numpy arrays through the pipe: a 60-example MNIST client is 188 KB),
  written out by the parent's task thread while a worker held the pool's one queue lock to read them: the workers
  waited on that lock longer than they trained. The rows are made with the pool, twice as large as the first
  round's largest client; a larger client later travels by value. A client's rows go as stored, with the
  conversion that makes them model inputs (MNIST's uint8 images: a quarter of their floats' bytes), and the
  worker converts them: in the first round of the 2NN, 100 clients, converting 10 clients' rows in this process
  before any worker started, and copying 4x the bytes, took 0.02-0.03 s of the 1.1 s to the first results.
The pool starts at the first round, when the weights' size is known, and restarts if a later round's differs.
Its workers fork from this process where that is safe (`start_method`): 0.03-0.05 s for two, against 1.4-1.5 s
to spawn two interpreters that each import torch (2 cores), which kept `auto` from choosing the pool for short runs.
Fork is safe for one torch thread a worker on the CPU: a forked child that runs an OpenMP region of more threads,
after the parent ran one, hangs (GNU OpenMP), and CUDA does not survive a fork.
With a GPU device (fl.device) each worker holds its model there and copies its update back to the CPU.
"""

from __future__ import annotations

import copy
import math
import mmap
import os
import pickle
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing as mp

from plait.core.flat import FlatSpec
from plait.federated.client_update import ClientData, Update, client_update
from plait.federated.device import CPU, model_device
from plait.federated.executor import ClientTask, torch_threads

SLOTS_PER_WORKER = 4          # chunks in flight per worker: enough that a worker never waits for the parent
MAX_CHUNK = 4                 # tasks a message carries at most: 100 six-step 2NN clients a round took 0.31-0.33 s in
                              # chunks of 4, 0.36-0.37 s one a message (the parent's CPU: 0.14 s against 0.20 s)
CHUNKS_PER_WORKER = 8         # and at least this many messages a worker a round: the last one's wait stays short
SLOT_BYTES = 1 << 30          # at most this much shared memory for result slots (a large model gets fewer)
INPUT_ALIGN = 64              # bytes: where each tensor in a slot's input row starts
INPUT_BYTES = 1 << 28         # at most this much shared memory for input rows (larger clients go by value)


class _Worker:
    model: torch.nn.Module
    spec: FlatSpec
    params: torch.Tensor      # the round's global weights, shared with the parent
    slots: torch.Tensor       # [slots, weights] result rows, shared with the parent
    inputs: torch.Tensor      # [slots, bytes] input rows, shared with the parent


_worker = _Worker()


def start_method(requested: str, device: torch.device, threads_per_worker: int) -> Literal["fork", "spawn"]:
    """"fork" or "spawn" for `requested` ("auto", "fork", "spawn"; fl.pool_start): auto forks where that is safe.
    ValueError, naming fl.pool_start, for fork where it is not."""
    unsafe = [why for why, bad in (
        ("this platform does not fork safely (Linux only)",
         not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods()),
        (f"the workers train on {device} (CUDA does not survive a fork)", device.type != "cpu"),
        ("this process has initialised CUDA", torch.cuda.is_initialized()),
        (f"{threads_per_worker} torch threads a worker (OpenMP hangs in a forked child that runs more than one)",
         threads_per_worker != 1)) if bad]
    if requested == "fork" and unsafe:
        raise ValueError(f"fl.pool_start = 'fork': {'; '.join(unsafe)}; use 'spawn' or 'auto'")
    if requested == "auto":
        return "spawn" if unsafe else "fork"
    if requested == "fork":
        return "fork"
    if requested == "spawn":
        return "spawn"
    raise ValueError(f"fl.pool_start = {requested!r}: use 'auto', 'fork' or 'spawn'")


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype, method: str) -> torch.Tensor:
    """An uninitialised tensor in memory the workers share. Forked workers inherit an anonymous shared mapping made
    here, whose pages come when first written; spawned ones are handed torch's shared memory, which
    `share_memory_()` fills by copying the tensor in (18-20 ms for the 30 MB of input rows of an MNIST run, most
    of which a round never writes: benchmarks/RESULTS.md, issue 13)."""
    if method != "fork":
        shared: torch.Tensor = torch.empty(shape, dtype=dtype).share_memory_()
        return shared
    nbytes = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, max(nbytes, 1))  # MAP_SHARED | MAP_ANONYMOUS; the tensor keeps it alive
    return torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes].view(dtype).reshape(shape)


def _init_worker(model: torch.nn.Module, threads: int, device: torch.device, spec: FlatSpec, params: torch.Tensor,
                 slots: torch.Tensor, inputs: torch.Tensor) -> None:
    # a forked worker has the parent's handlers: the parent alone answers an interrupt (it ends the pool), and
    # the pool's terminate() must end a worker whatever the parent does on SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)
    _worker.model, _worker.spec, _worker.params, _worker.slots = model.to(device), spec, params, slots
    _worker.inputs = inputs


def _run_task(args: tuple[int, Any, Any, Any, Any, Any, Any, int]
              ) -> tuple[int, tuple[int, dict[str, float], Any] | str]:
    client_id, plan, x, y, convert, task, local, slot = args
    try:
        row = _worker.inputs[slot]
        own = (_unpack(local[0], row), local[1]) if local is not None else None
        update = client_update(_worker.model, _worker.spec, _worker.params,
                               ClientData(_unpack(x, row), _unpack(y, row), convert), plan, task, own).cpu()
        _worker.slots[slot].copy_(update.delta)
        buffers = _to_wire(update.local_buffers) if update.local_buffers is not None else None
        return client_id, (update.num_examples, update.metrics, buffers)
    except Exception as err:  # returned, not raised: the parent names the client
        return client_id, f"{type(err).__name__}: {err}"


def _run_tasks(messages: list[tuple[int, Any, Any, Any, Any, Any, Any, int]]) -> list[tuple[int, Any]]:
    """A chunk of tasks, one message each way: per message the pool costs both processes pickling, a pipe, its
    locks and the parent's handler threads."""
    return [_run_task(message) for message in messages]


def _to_wire(x: Any) -> Any:
    """CPU tensors as numpy arrays, which pickle by value (a tensor would go through a shared-memory descriptor)."""
    if isinstance(x, tuple):
        return tuple(_to_wire(part) for part in x)
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad:
        try:
            return x.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16): through shared memory after all
            return x
    return x


def _from_wire(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_from_wire(part) for part in x)
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


@dataclass(frozen=True, slots=True)
class _Packed:
    """Where a task's tensor lies in its slot's shared input row."""
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _packable(x: Any) -> bool:
    """A CPU tensor, which goes into a row (anything else travels by value)."""
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.layout == torch.strided \
        and not x.requires_grad


def _tensors(values: tuple[Any, ...]) -> list[torch.Tensor]:
    """The packable tensors among `values` (tensors, tuples of tensors, or anything else)."""
    return [t for v in values for t in (v if isinstance(v, tuple) else (v,)) if _packable(t)]


def _span(x: torch.Tensor) -> int:
    """Bytes `x` takes in a row, rounded up to INPUT_ALIGN (each tensor starts aligned for any dtype)."""
    return -(-x.numel() * x.element_size() // INPUT_ALIGN) * INPUT_ALIGN


def _row_bytes(values: tuple[Any, ...]) -> int:
    return sum(_span(t) for t in _tensors(values))


def _view(row: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return row[offset : offset + nbytes].view(dtype).view(shape)


def _pack(row: torch.Tensor, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """`values` with each CPU tensor copied into `row` and replaced by where it lies there; by value (`_to_wire`)
    when they do not fit."""
    if _row_bytes(values) > row.numel():
        return tuple(_to_wire(v) for v in values)
    offset = 0

    def put(x: Any) -> Any:
        nonlocal offset
        if isinstance(x, tuple):
            return tuple(put(part) for part in x)
        if not _packable(x):
            return x
        _view(row, offset, x.dtype, tuple(x.shape)).copy_(x)
        packed = _Packed(offset, x.dtype, tuple(x.shape))
        offset += _span(x)
        return packed

    return tuple(put(v) for v in values)


def _unpack(x: Any, row: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return tuple(_unpack(part, row) for part in x)
    if isinstance(x, _Packed):  # a view: the slot's next task overwrites it, after this one has trained
        return _view(row, x.offset, x.dtype, x.shape)
    return _from_wire(x)


def _shippable(convert: Callable[..., Any]) -> bool:
    """Whether a conversion of inputs can travel with a task: a module-level function pickles by name, a lambda or
    a closure does not (its task then travels converted)."""
    try:
        pickle.dumps(convert)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


class ProcessPoolExecutor:
    """`num_workers` persistent processes (default: one per core) training on `device` (default: where `model`
    lives), started by `start` (fl.pool_start: "auto", "fork", "spawn"). The model is sent once, at start, from the
    CPU."""

    def __init__(self, model: torch.nn.Module, num_workers: int = 0, threads_per_worker: int = 1,
                 device: torch.device | None = None, start: str = "auto"):
        self.num_workers = num_workers or max(1, os.cpu_count() or 1)
        self.threads_per_worker = threads_per_worker
        self.device = device or model_device(model)
        self.start = start
        start_method(start, self.device, threads_per_worker)  # a setting that cannot work fails here, not at round 1
        if self.device != CPU or model_device(model) != CPU:
            # The workers' copy is pickled now and again if a worker is replaced: it must hold no CUDA tensors, and
            # the caller's module may move to the GPU later (the server evaluates there).
            model = copy.deepcopy(model).cpu()
        self._model = model
        self._pool: Any = None
        self._shape: tuple[FlatSpec, int, torch.dtype] | None = None
        self._params = torch.empty(0)
        self._slots = torch.empty(0, 0)
        self._inputs = torch.empty(0, 0, dtype=torch.uint8)
        self._shippable: dict[Callable[..., Any], bool] = {}

    def _task_tensors(self, task: ClientTask) -> tuple[tuple[Any, Any, Any], Callable[..., Any] | None]:
        """What of a task travels as data (its inputs, labels and own buffers), and the conversion the worker applies
        to the inputs: stored rows (MNIST's uint8, a quarter of their floats) are converted by the worker that trains
        them, in parallel, where the conversion can travel."""
        own = task.local[0] if task.local is not None else None
        convert = task.data.convert
        if convert is not None and convert not in self._shippable:  # pickled once per conversion, not per task
            self._shippable[convert] = _shippable(convert)
        if convert is not None and not self._shippable[convert]:
            return (task.data.inputs(), task.data.y, own), None
        return (task.data.x, task.data.y, own), convert

    def _start(self, spec: FlatSpec, global_params: torch.Tensor, tasks: list[ClientTask]) -> None:
        """Start the workers with shared buffers for weights of this size (again if the size changed), and input
        rows for clients up to twice the size of `tasks`' largest."""
        shape = (spec, global_params.numel(), global_params.dtype)
        if self._pool is not None and self._shape == shape:
            return
        self.close()
        row_bytes = global_params.numel() * global_params.element_size()
        # slots for this round's chunks (a later round with more clients sends larger chunks only as slots allow):
        # shared memory is written through when it is made, 0.09 s for 32 rows of a 600-example MNIST client
        wanted = SLOTS_PER_WORKER * self.num_workers * self._chunk(len(tasks), MAX_CHUNK * 2 * self.num_workers)
        count = max(self.num_workers + 1, min(wanted, SLOT_BYTES // max(row_bytes, 1)))
        largest = max((_row_bytes(self._task_tensors(task)[0]) for task in tasks), default=0)
        input_bytes = min(max(2 * largest, INPUT_ALIGN), INPUT_BYTES // count)
        method = start_method(self.start, self.device, self.threads_per_worker)
        self._params = _shared_empty(tuple(global_params.shape), global_params.dtype, method)
        self._slots = _shared_empty((count, global_params.numel()), global_params.dtype, method)
        self._inputs = _shared_empty((count, input_bytes), torch.uint8, method)
        if method == "fork":  # text still buffered here would be written again by each child as it exits
            sys.stdout.flush()
            sys.stderr.flush()
        self._pool = mp.get_context(method).Pool(
            self.num_workers, initializer=_init_worker,
            initargs=(self._model, self.threads_per_worker, self.device, spec, self._params, self._slots,
                      self._inputs))
        self._shape = shape

    def run(self, model: torch.nn.Module, spec: FlatSpec, global_params: torch.Tensor,
            tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Update]]:
        self._start(spec, global_params, tasks)
        self._params.copy_(global_params.detach())
        free = list(range(len(self._slots)))
        chunk = self._chunk(len(tasks), len(free))
        pending: deque[tuple[list[ClientTask], list[int], Any]] = deque()
        queue = deque(tasks)

        def submit() -> None:
            while queue and len(free) >= min(chunk, len(queue)):
                batch = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                slots = [free.pop() for _ in batch]
                messages = []
                for task, slot in zip(batch, slots):
                    tensors, convert = self._task_tensors(task)
                    x, y, own = _pack(self._inputs[slot], tensors)
                    local = (own, task.local[1]) if task.local is not None else None
                    messages.append((task.client_id, task.plan, x, y, convert, task.task, local, slot))
                pending.append((batch, slots, self._pool.apply_async(_run_tasks, (messages,))))

        # while the workers train, this process checks and folds in their updates on one thread: with more, each of
        # those short ops waits for a core a worker holds (py-spy: folding 2NN updates took more samples than the
        # forward passes did)
        with torch_threads(1):
            try:
                submit()
                # in task order: updates are folded in that order, so a run gives the same bits as the sequential
                # backend and as itself (float sums depend on order); each still arrives as soon as its turn comes
                while pending:
                    batch, slots, result = pending.popleft()
                    outcomes = result.get()
                    for task, slot, (client_id, outcome) in zip(batch, slots, outcomes):
                        if isinstance(outcome, str):
                            raise RuntimeError(f"client {client_id}: local training failed: {outcome}")
                        examples, metrics, buffers = outcome
                        update = Update(self._slots[slot].clone(), examples, metrics,
                                        _from_wire(buffers) if buffers is not None else None)
                        free.append(slot)
                        submit()
                        yield task, update
            finally:
                for _, _, result in pending:  # tasks still in flight must not write into next round's slots
                    result.wait()

    def _chunk(self, tasks: int, slots: int) -> int:
        """Tasks a message carries: up to MAX_CHUNK when there are enough for CHUNKS_PER_WORKER messages a worker,
        and few enough that `slots` hold two messages a worker (one training, the next waiting)."""
        return max(1, min(MAX_CHUNK, tasks // (self.num_workers * CHUNKS_PER_WORKER), slots // (2 * self.num_workers)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
