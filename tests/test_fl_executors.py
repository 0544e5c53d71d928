"""One shared check on every client-execution backend: the same tasks give the same updates."""

import pytest
import torch

from plait.core.flat import flat_params
from plait.core.models import build_model
from plait.federated.client_update import ClientData, client_update
from plait.federated.executor import ClientTask, SequentialExecutor
from plait.federated.plan import TrainingPlan
from plait.federated.pool_executor import ProcessPoolExecutor


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


@pytest.mark.parametrize("backend", ["sequential", "process_pool"])
def test_backend_matches_reference_updates(backend, model_and_params):
    # Prepare
    model, spec, params = model_and_params
    tasks = _tasks()
    reference = {t.client_id: client_update(model, spec, params, t.data, t.plan) for t in tasks}
    executor = SequentialExecutor() if backend == "sequential" else ProcessPoolExecutor(model, num_workers=2)
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


def test_pool_names_the_failing_client(model_and_params):
    model, spec, params = model_and_params
    bad = ClientTask(7, TrainingPlan(), ClientData(torch.randn(4, 1, 28, 28), torch.full((4,), 99)))  # label 99
    executor = ProcessPoolExecutor(model, num_workers=1)
    try:
        with pytest.raises(RuntimeError, match="client 7"):
            list(executor.run(model, spec, params, [bad]))
    finally:
        executor.close()
