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


def test_a_full_batch_in_chunks_gives_the_whole_batch_gradient(monkeypatch):
    """FedSGD (B = 0) on more examples than a chunk: the chunks' weighted gradients add up to the whole batch's,
    the same update as one plain-torch full-batch step; a model with BatchNorm takes the batch whole."""
    from plait.federated import client_update as module

    torch.manual_seed(0)
    data = ClientData(torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    plan = TrainingPlan(epochs=1, batch_size=0, lr=0.1, seed=3)
    model = build_model("2nn")
    global_params, spec = flat_params(model)
    reference = build_model("2nn")
    reference.load_state_dict(model.state_dict())
    torch.optim.SGD(reference.parameters(), lr=0.1).zero_grad()
    F.cross_entropy(reference(data.x), data.y).backward()
    with torch.no_grad():
        expected = torch.cat([-0.1 * p.grad.flatten() for p in reference.parameters()])
    monkeypatch.setattr(module, "CHUNK", 16)  # 100 examples: 7 chunks, the last one of 4
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    chunked = client_update(model, spec, global_params, data, plan)
    torch.testing.assert_close(chunked.delta, expected, rtol=1e-5, atol=1e-7)
    assert chunked.metrics["steps"] == 1 and seen == [16] * 6 + [4]

    seen.clear()
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.BatchNorm1d(8),
                             torch.nn.Linear(8, 10))
    bn.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    bn_params, bn_spec = flat_params(bn)
    client_update(bn, bn_spec, bn_params, data, plan)
    assert seen == [100]  # not chunked: BatchNorm's statistics are the whole batch's
