"""Evaluation batches on Python threads, one torch thread each (federated/batch_threads.py)."""

import threading
import time

import pytest
import torch

from plait.federated.batch_threads import on_threads
from plait.federated.task import NextWord, evaluate_batches


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_work_is_shared_by_two_threads_of_one_torch_thread_each_and_comes_back_in_order(two_threads):
    seen = []

    def work(i):
        time.sleep(0.01)  # long enough that the second thread takes some
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return i * i

    assert on_threads(work, 12) == [i * i for i in range(12)]
    assert len({ident for ident, _, _ in seen}) == 2
    assert all(count == 1 and inference for _, count, inference in seen)
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_one_torch_thread_runs_the_work_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idents = on_threads(lambda i: threading.get_ident(), 4)
    finally:
        torch.set_num_threads(before)
    assert set(idents) == {threading.get_ident()}


def test_a_failure_on_a_thread_reaches_the_caller(two_threads):
    def work(i):
        if i == 3:
            raise ValueError("batch 3 is bad")
        return i

    done = []

    def slow_work(i):
        if i == 0:  # the first thread's first batch: the other thread still has batches to run
            raise ValueError("batch 0 is bad")
        time.sleep(0.02)
        done.append(i)
        return i

    with pytest.raises(ValueError, match="batch 3 is bad"):
        on_threads(work, 8)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="batch 0 is bad"):
        on_threads(slow_work, 8)
    finished = len(done)
    time.sleep(0.1)
    assert len(done) == finished  # the other thread had stopped before the error reached the caller


def test_evaluation_gives_the_same_bits_on_one_thread_and_on_two():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 5, (300,))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = evaluate_batches(NextWord(), model, x, y, batch_size=16)
        torch.set_num_threads(2)
        two = evaluate_batches(NextWord(), model, x, y, batch_size=16)
    finally:
        torch.set_num_threads(before)
    assert one == two and one["num_examples"] == 300  # the batches' sums added in the same order
    with torch.no_grad():  # and they are the metrics: a single pass over all 300 by hand
        logits = model(x)
    assert one["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert one["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def _in_forked_child(count):
    torch.set_num_threads(2)
    return on_threads(lambda i: i + 1, count)


def test_a_forked_child_makes_its_own_threads(two_threads):
    import multiprocessing

    on_threads(lambda i: time.sleep(0.01), 4)  # this process's pool exists, both its threads have worked
    time.sleep(0.1)  # and wait idle: a child's copy of the pool would count them as free and start none
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        assert pool.apply_async(_in_forked_child, (4,)).get(timeout=30) == [1, 2, 3, 4]
    finally:
        pool.terminate()
        pool.join()
