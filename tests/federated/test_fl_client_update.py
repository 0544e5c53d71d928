import torch
import torch.nn.functional as F

from plait.core.flat import flat_params
from plait.core.models import build_model
from plait.federated.client_update import ClientData, client_update
from plait.federated.plan import TrainingPlan


def _reference_sgd(model, data, plan):
    """Plain torch: nn.Module + torch.optim.SGD over the same shuffled batches."""
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    generator = torch.Generator().manual_seed(plan.seed)
    for _ in range(plan.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), plan.batch_size):
            idx = order[start : start + plan.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()


def test_client_update_equals_plain_torch_sgd():
    # Prepare: a 2NN and 45 random examples (the last batch is partial)
    torch.manual_seed(0)
    model = build_model("2nn")
    data = ClientData(torch.randn(45, 1, 28, 28), torch.randint(0, 10, (45,)))
    plan = TrainingPlan(epochs=2, batch_size=10, lr=0.05, momentum=0.9, weight_decay=1e-3, seed=7)
    global_params, spec = flat_params(model)
    # Execute
    update = client_update(model, spec, global_params, data, plan)
    _reference_sgd(model, data, plan)
    # Assert: same weights as the reference; the module itself is left as it was by client_update
    reference, _ = flat_params(model)
    assert torch.allclose(global_params + update.delta, reference, atol=1e-5)
    assert update.num_examples == 45 and update.metrics["steps"] == 10


def test_fedprox_term_pulls_towards_global():
    torch.manual_seed(1)
    model = build_model("2nn")
    data = ClientData(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    global_params, spec = flat_params(model)
    plain = client_update(model, spec, global_params, data, TrainingPlan(epochs=3, lr=0.1))
    prox = client_update(model, spec, global_params, data, TrainingPlan(epochs=3, lr=0.1, prox_mu=1.0))
    assert prox.delta.norm() < plain.delta.norm()


def test_max_steps_caps_local_work():
    model = build_model("2nn")
    data = ClientData(torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    params, spec = flat_params(model)
    update = client_update(model, spec, params, data, TrainingPlan(epochs=5, batch_size=10, max_steps=7))
    assert update.metrics["steps"] == 7
