"""One shared check on every client-execution backend: the same tasks give the same updates."""

import pytest
import torch

from plait.core.flat import flat_params
from plait.core.models import build_model
from plait.data.image_tensors import images_to_tensor
from plait.federated.client_update import ClientData, client_update
from plait.federated.executor import ClientTask, SequentialExecutor
from plait.federated.plan import TrainingPlan
from plait.federated.pool_executor import ProcessPoolExecutor
from plait.federated.thread_executor import ThreadPoolExecutor


def _tasks(num_clients=5):
    generator = torch.Generator().manual_seed(0)
    return [ClientTask(cid, TrainingPlan(batch_size=8, lr=0.05, seed=cid),
                       ClientData(torch.randn(20 + cid, 1, 28, 28, generator=generator),
                                  torch.randint(0, 10, (20 + cid,), generator=generator)))
            for cid in range(num_clients)]


@pytest.fixture(scope="module")
def model_and_params():
    torch.manual_seed(0)
    model = build_model("2nn")
    params, spec = flat_params(model)
    return model, spec, params


def _executor(backend, model):
    if backend == "threads":
        return ThreadPoolExecutor(model, num_workers=2)
    if backend == "process_pool_spawn":  # fresh interpreters (the default forks where it is safe)
        return ProcessPoolExecutor(model, num_workers=2, start="spawn")
    return SequentialExecutor() if backend == "sequential" else ProcessPoolExecutor(model, num_workers=2)


@pytest.mark.parametrize("backend", ["sequential", "threads", "process_pool", "process_pool_spawn"])
def test_backend_matches_reference_updates(backend, model_and_params):
    # Prepare
    model, spec, params = model_and_params
    tasks = _tasks()
    reference = {t.client_id: client_update(model, spec, params, t.data, t.plan) for t in tasks}
    executor = _executor(backend, model)
    threads = torch.get_num_threads()
    # Execute
    try:
        results = {t.client_id: u for t, u in executor.run(model, spec, params, tasks)}
    finally:
        executor.close()
    # Assert: every client once, same delta and example count
    assert sorted(results) == list(range(5))
    for cid, update in results.items():
        assert update.num_examples == 20 + cid
        assert torch.equal(update.delta, reference[cid].delta)  # same function, same inputs: the same bits
    assert torch.get_num_threads() == threads  # the threads' one torch thread each did not leak into this one


def test_sequential_trains_on_its_own_thread_count_and_puts_the_process_one_back(model_and_params):
    model, spec, params = model_and_params
    tasks = _tasks(2)
    reference = {t.client_id: client_update(model, spec, params, t.data, t.plan) for t in tasks}
    threads, seen = torch.get_num_threads(), set()
    hook = model.register_forward_pre_hook(lambda *_: seen.add(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        results = {t.client_id: u for t, u in SequentialExecutor(train_threads=1).run(model, spec, params, tasks)}
        assert seen == {1} and torch.get_num_threads() == 2  # trained on 1; the process's 2 are back
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    for cid, update in results.items():
        assert torch.allclose(update.delta, reference[cid].delta, atol=1e-6)  # threads change sums' order only


def test_auto_trains_sequential_clients_on_one_thread_when_that_is_as_fast(monkeypatch):
    """`training_threads` times a few steps on one thread and on all: 0 (keep the process's setting) when all are
    at least THREADS_GAIN times as fast, 1 otherwise, and 0 without measuring when the process has one thread."""
    from plait.federated.backends import auto
    from plait.federated.task import Task

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    params, spec = flat_params(model)
    data = ClientData(torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,)))
    plan = TrainingPlan(batch_size=10, lr=0.1)
    threads = torch.get_num_threads()
    try:
        for one, many, expected in [(1.0, 2.0, 1), (1.1, 1.0, 1), (2.0, 1.0, 0)]:  # 1.1x: not worth a core
            monkeypatch.setattr(auto, "_best_time",
                                lambda call, o=one, m=many: (call(), o if torch.get_num_threads() == 1 else m)[1])
            torch.set_num_threads(2)
            chosen, why = auto.training_threads(model, spec, params, data, plan, Task())
            assert chosen == expected and "on 1 thread" in why and torch.get_num_threads() == 2, why
        torch.set_num_threads(1)
        assert auto.training_threads(model, spec, params, data, plan, Task())[0] == 0
    finally:
        torch.set_num_threads(threads)


def test_threads_refuse_a_model_that_draws_random_numbers(model_and_params):
    _, spec, params = model_and_params
    torch.manual_seed(0)
    dropout = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(784, 10))
    params, spec = flat_params(dropout)
    executor = ThreadPoolExecutor(dropout, num_workers=2)
    try:
        with pytest.raises(ValueError, match="fl.executor = 'threads'.*random numbers"):
            list(executor.run(dropout, spec, params, _tasks(2)))
    finally:
        executor.close()


def test_threads_name_the_failing_client(model_and_params):
    model, spec, params = model_and_params
    good = _tasks(1)[0]
    bad = ClientTask(7, TrainingPlan(), ClientData(torch.randn(4, 1, 28, 28), torch.full((4,), 99)))  # label 99
    executor = ThreadPoolExecutor(model, num_workers=2)
    try:
        results = executor.run(model, spec, params, [good, bad])
        assert next(results)[0].client_id == 0  # the client before the failing one still comes through
        with pytest.raises(RuntimeError, match="client 7"):
            next(results)
    finally:
        executor.close()


def test_pool_names_the_failing_client(model_and_params):
    model, spec, params = model_and_params
    bad = ClientTask(7, TrainingPlan(), ClientData(torch.randn(4, 1, 28, 28), torch.full((4,), 99)))  # label 99
    executor = ProcessPoolExecutor(model, num_workers=1)
    try:
        with pytest.raises(RuntimeError, match="client 7"):
            list(executor.run(model, spec, params, [bad]))
    finally:
        executor.close()


def test_auto_measures_a_client_and_says_which_executor_and_why(tmp_path):
    from plait.federated.backends.auto import choose_executor
    from plait.federated.client_update import ClientData
    from plait.federated.config import FederatedRunConfig
    from plait.federated.simulation import build_server
    from plait.federated.task import Task
    from plait.federated.weights import flat_model_state
    from plait.settings.config import from_dict
    from tests_support import shapes_config

    raw = shapes_config(tmp_path, executor="auto")
    server = build_server(from_dict(FederatedRunConfig, raw))
    assert server.config.executor in ("sequential", "threads", "process_pool")  # decided, recorded in the config
    assert server.config.worker_threads in (0, 1)  # the sequential executor's training threads, measured
    server.close()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    params, spec = flat_model_state(model, buffers=True)
    data = ClientData(torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,)))
    plan = TrainingPlan(batch_size=10, lr=0.1)
    assert choose_executor(model, spec, params, data, plan, Task(), cores=1)[0] == "sequential"
    tiny, why = choose_executor(model, spec, params, data, plan, Task(), cores=2)
    assert tiny == "sequential" and "too little over 1 rounds" in why  # 4 tiny steps, one client: overhead-bound
    forty_steps = TrainingPlan(epochs=10, batch_size=10, lr=0.1)  # a few ms: still under the 50 ms line
    many, why = choose_executor(model, spec, params, data, forty_steps, Task(), cores=2, clients_per_round=1000,
                                rounds=1000)
    assert many == "process_pool" and "too short for threads" in why  # a million of them pay the pool's start
    long_plan = TrainingPlan(epochs=2000, batch_size=1, lr=0.01)  # 80,000 steps: long enough to run in parallel
    chosen, why = choose_executor(model, spec, params, data, long_plan, Task(), cores=2)
    assert chosen in ("threads", "process_pool")  # which of the two is measured: test_auto_picks_threads_only_...
    assert ("2 threads" if chosen == "threads" else "2 workers") in why


def test_pool_sends_many_clients_in_chunks_and_returns_them_in_order(model_and_params):
    """80 clients on 2 workers go 4 to a message (pool_executor.MAX_CHUNK); each update is the one this process
    computes, in task order, whether the workers were forked or spawned."""
    from plait.federated import pool_executor

    model, spec, params = model_and_params
    tasks = _tasks(80)
    reference = [client_update(model, spec, params, t.data, t.plan) for t in tasks]
    sent = []
    for start in ("fork", "spawn"):
        executor = ProcessPoolExecutor(model, num_workers=2, start=start)
        real_apply = None
        try:
            list(executor.run(model, spec, params, tasks))  # starts the pool, its slots sized for this round
            real_apply = executor._pool.apply_async

            def counting(fn, args, real=real_apply):
                sent.append(len(args[0]))
                return real(fn, args)

            executor._pool.apply_async = counting
            results = list(executor.run(model, spec, params, tasks))
        finally:
            executor.close()
        assert [t.client_id for t, _ in results] == list(range(80))
        for (_, got), want in zip(results, reference, strict=True):
            assert torch.equal(got.delta, want.delta)
    assert sent == [pool_executor.MAX_CHUNK] * 40  # 20 messages of 4 a start method, not 80 of 1


def test_pool_start_method_forks_only_where_that_is_safe():
    from plait.federated.config import FLConfig
    from plait.federated.pool_executor import start_method

    cpu = torch.device("cpu")
    assert start_method("auto", cpu, 1) == "fork"  # Linux, the CPU, one torch thread a worker
    assert start_method("auto", cpu, 2) == "spawn"  # OpenMP hangs in a forked child running more threads
    assert start_method("auto", torch.device("cuda"), 1) == "spawn"  # CUDA does not survive a fork
    assert start_method("spawn", cpu, 1) == "spawn"
    with pytest.raises(ValueError, match="fl.pool_start = 'fork'.*2 torch threads"):
        start_method("fork", cpu, 2)
    with pytest.raises(ValueError, match="fl.pool_start = 'fork'.*worker_threads"):
        FLConfig(pool_start="fork", worker_threads=2)
    with pytest.raises(ValueError, match="fl.pool_start = 'fork'"):
        ProcessPoolExecutor(torch.nn.Linear(2, 2), threads_per_worker=2, start="fork")  # before any worker starts


def test_auto_weighs_the_pools_start_by_how_its_workers_start(monkeypatch):
    """Clients of 2 ms, 100 a round, 4 rounds, 2 cores: the pool would save 0.28 s. That repays forked workers'
    start (0.05 s) and not spawned ones' (1.5 s)."""
    import time as time_module

    from plait.federated.backends import auto
    from plait.federated.task import Task
    from plait.federated.weights import flat_model_state

    monkeypatch.setattr(auto, "client_update", lambda *args, **kwargs: time_module.sleep(0.002))
    model = torch.nn.Linear(4, 2)
    params, spec = flat_model_state(model, buffers=True)
    data = ClientData(torch.randn(20, 4), torch.randint(0, 2, (20,)))
    plan = TrainingPlan(batch_size=10, lr=0.1)
    forked, why = auto.choose_executor(model, spec, params, data, plan, Task(), cores=2, clients_per_round=100,
                                       rounds=4, pool_start="fork")
    assert forked == "process_pool" and "0.05 s start (fork)" in why, why
    spawned, why = auto.choose_executor(model, spec, params, data, plan, Task(), cores=2, clients_per_round=100,
                                        rounds=4, pool_start="spawn")
    assert spawned == "sequential" and "1.5 s start (spawn)" in why, why


def test_auto_separates_a_clients_fixed_cost_from_its_steps(monkeypatch):
    """A client costing 30 ms fixed + 2 ms a step, with a 10-step plan, is estimated at 50 ms; scaling 5 timed
    steps up (the old estimate) would count the fixed cost once per step and read 80 ms."""
    import re
    import time as time_module

    from plait.federated.backends import auto
    from plait.federated.client_update import ClientData
    from plait.federated.task import Task
    from plait.federated.weights import flat_model_state

    def fake_update(model, spec, params, data, plan, task, **kwargs):
        time_module.sleep(0.030 + 0.002 * plan.num_steps(len(data)))

    monkeypatch.setattr(auto, "client_update", fake_update)
    model = torch.nn.Linear(4, 2)
    params, spec = flat_model_state(model, buffers=True)
    data = ClientData(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    _, why = auto.choose_executor(model, spec, params, data, TrainingPlan(batch_size=10, lr=0.1), Task(), cores=2)
    estimate_ms = float(re.search(r"takes ([\d.]+) ms", why).group(1))
    assert 45 <= estimate_ms <= 62, why


def test_auto_picks_threads_only_when_they_speed_training_up(monkeypatch):
    """Threads when two of them train (at least THREADS_WORTH times) as fast as one; the pool when they gain too
    little, or when the model draws random numbers; a real dropout model measures as 0 (refused)."""
    from plait.federated.backends import auto
    from plait.federated.task import Task
    from plait.federated.weights import flat_model_state

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    params, spec = flat_model_state(model, buffers=True)
    data = ClientData(torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,)))
    long_plan = TrainingPlan(epochs=2000, batch_size=1, lr=0.01)  # long enough for a parallel executor
    for speedup, expected, said in [(1.9, "threads", "1.90x"), (1.1, "process_pool", "only 1.10x"),
                                    (0.0, "process_pool", "random numbers")]:
        monkeypatch.setattr(auto, "_thread_speedup", lambda *args, s=speedup: s)
        chosen, why = auto.choose_executor(model, spec, params, data, long_plan, Task(), cores=2)
        assert chosen == expected and said in why, why
    monkeypatch.undo()
    dropout = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4))
    params, spec = flat_model_state(dropout, buffers=True)
    assert auto._thread_speedup(dropout, spec, params, data, TrainingPlan(lr=0.1), Task()) == 0.0


class _TwoInputs(torch.nn.Module):
    """Two inputs and BatchNorm statistics: what travels to a worker besides one image tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, first, second):
        return self.out(self.norm(self.a(first)) + self.b(second))


@pytest.mark.parametrize("backend", ["threads", "process_pool", "process_pool_spawn"])
def test_parallel_backends_carry_several_inputs_and_a_clients_own_buffers(backend):
    from plait.federated.weights import flat_model_state, local_buffer_state

    torch.manual_seed(0)
    model = _TwoInputs()
    params, spec = flat_model_state(model, buffers=False)
    own = local_buffer_state(model)
    generator = torch.Generator().manual_seed(1)
    tasks = [ClientTask(cid, TrainingPlan(batch_size=4, lr=0.1, seed=cid),
                        ClientData((torch.randn(12, 4, generator=generator), torch.randn(12, 3, generator=generator)),
                                   torch.randint(0, 2, (12,), generator=generator)),
                        local=(own[0] + cid, own[1]))  # each client's statistics its own
             for cid in range(3)]
    reference = [client_update(model, spec, params, t.data, t.plan, None, t.local) for t in tasks]
    executor = _executor(backend, model)
    try:
        results = [u for _, u in executor.run(model, spec, params, tasks)]
    finally:
        executor.close()
    for got, want in zip(results, reference, strict=True):
        assert torch.equal(got.delta, want.delta)
        assert torch.equal(got.local_buffers, want.local_buffers) and not torch.equal(got.local_buffers, own[0])


def test_pool_takes_clients_its_input_rows_cannot_hold(model_and_params):
    """The pool's shared input rows are sized by the first round's largest client (twice it); a larger client later
    travels by value, and a non-contiguous one is packed contiguous: both train as in this process."""
    model, spec, params = model_and_params
    generator = torch.Generator().manual_seed(3)
    small = _tasks(2)
    odd = torch.randn(28, 28, 1, 16, generator=generator).permute(3, 2, 0, 1)  # [16, 1, 28, 28], not contiguous
    small.append(ClientTask(5, TrainingPlan(batch_size=8, lr=0.05, seed=5),
                            ClientData(odd, torch.randint(0, 10, (16,), generator=generator))))
    big = ClientTask(9, TrainingPlan(batch_size=8, lr=0.05, seed=9),
                     ClientData(torch.randn(90, 1, 28, 28, generator=generator),
                                torch.randint(0, 10, (90,), generator=generator)))
    executor = ProcessPoolExecutor(model, num_workers=2)
    try:
        list(executor.run(model, spec, params, small))
        assert executor._inputs.shape[1] < big.data.x.numel() * 4  # the test reaches the by-value path
        second = {t.client_id: u for t, u in executor.run(model, spec, params, [big, *small])}
    finally:
        executor.close()
    for task in [big, *small]:
        assert torch.equal(second[task.client_id].delta, client_update(model, spec, params, task.data, task.plan).delta)


def test_threads_refuse_a_gpu_device(model_and_params):
    model, _, _ = model_and_params  # on the CPU, as when the executor is built: fl.device names the GPU
    with pytest.raises(ValueError, match="fl.executor = 'threads' trains on the CPU"):
        ThreadPoolExecutor(model, num_workers=2, device=torch.device("cuda"))


@pytest.mark.parametrize("backend", ["sequential", "threads", "process_pool", "process_pool_spawn"])
@pytest.mark.parametrize("conversion", ["module_function", "lambda"])
def test_raw_rows_are_converted_where_the_client_trains(backend, conversion, model_and_params):
    """uint8 images with their conversion (as FederatedData stores MNIST): every backend trains on what the
    conversion makes, with the same bits as training on converted inputs; a pool ships the raw rows (a quarter of
    the floats' bytes) and a conversion that pickles by name, and converts in this process one that does not."""
    model, spec, params = model_and_params
    generator = torch.Generator().manual_seed(4)
    convert = images_to_tensor if conversion == "module_function" else (lambda x: images_to_tensor(x))
    tasks = [ClientTask(cid, TrainingPlan(batch_size=8, lr=0.05, seed=cid),
                        ClientData(torch.randint(0, 256, (24 + cid, 28, 28), dtype=torch.uint8, generator=generator),
                                   torch.randint(0, 10, (24 + cid,), generator=generator), convert))
             for cid in range(4)]
    reference = {t.client_id: client_update(model, spec, params, ClientData(images_to_tensor(t.data.x), t.data.y),
                                            t.plan) for t in tasks}
    executor = _executor(backend, model)
    try:
        results = {t.client_id: u for t, u in executor.run(model, spec, params, tasks)}
        if isinstance(executor, ProcessPoolExecutor):
            raw = 27 * 28 * 28  # the largest client's uint8 rows; its floats take four times as many bytes
            assert executor._inputs.shape[1] < 3 * raw if conversion == "module_function" else \
                executor._inputs.shape[1] >= 2 * 4 * raw
    finally:
        executor.close()
    assert sorted(results) == list(range(4))
    for cid, update in results.items():
        assert torch.equal(update.delta, reference[cid].delta)
