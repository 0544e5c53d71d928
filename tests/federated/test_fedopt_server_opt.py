"""Server optimizers (Reddi et al. 2021) against hand-computed steps, and FedProx's proximal term."""

import math

import pytest
import torch
from torch import nn

from plait.core.flat import flat_params
from plait.federated.client_update import ClientData, client_update
from plait.federated.plan import TrainingPlan
from plait.federated.server_opt import DEFAULT_LR, ServerOptConfig, build_server_opt

W0 = torch.tensor([1.0, -1.0])
D1 = torch.tensor([0.5, -2.0])
D2 = torch.tensor([-1.0, 1.0])


def _two_steps(name, **kw):
    opt = build_server_opt(ServerOptConfig(name=name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, **kw))
    state = opt.init(W0.clone())
    w1, state = opt.apply(W0.clone(), D1, state)
    w2, state = opt.apply(w1, D2, state)
    return w1, w2


def _expected(update_v):
    tau, lr = 1e-3, 0.1
    m, v, w, out = [0.0, 0.0], [tau**2] * 2, W0.tolist(), []
    for d in (D1.tolist(), D2.tolist()):
        for i in range(2):
            m[i] = 0.9 * m[i] + 0.1 * d[i]
            v[i] = update_v(v[i], d[i] ** 2)
            w[i] = w[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(w))
    return out


@pytest.mark.parametrize("name,update_v", [
    ("adagrad", lambda v, sq: v + sq),
    ("adam", lambda v, sq: 0.99 * v + 0.01 * sq),
    ("yogi", lambda v, sq: v - 0.01 * sq * (1 if v > sq else -1 if v < sq else 0)),
])
def test_adaptive_server_optimizers_by_hand(name, update_v):
    w1, w2 = _two_steps(name)
    e1, e2 = _expected(update_v)
    assert torch.allclose(w1, torch.tensor(e1), rtol=1e-5) and torch.allclose(w2, torch.tensor(e2), rtol=1e-5)


def test_adam_first_step_hand_value():
    # m = 0.05, v = 0.99e-6 + 0.01·0.25 = 0.00250099, w = 1 + 0.1·0.05/(0.0500099 + 0.001)
    w1, _ = _two_steps("adam")
    assert abs(float(w1[0]) - (1 + 0.1 * 0.05 / (math.sqrt(0.99e-6 + 0.0025) + 1e-3))) < 1e-6


def test_fedavgm_momentum():
    opt = build_server_opt(ServerOptConfig(name="sgd", lr=1.0, momentum=0.5))
    state = opt.init(W0.clone())
    w1, state = opt.apply(W0.clone(), D1, state)
    w2, _ = opt.apply(w1, D2, state)
    assert torch.allclose(w2, W0 + D1 + (0.5 * D1 + D2))


def test_config_errors():
    with pytest.raises(ValueError, match="momentum applies to sgd"):
        ServerOptConfig(name="adam", momentum=0.9)
    with pytest.raises(ValueError, match="tau"):
        ServerOptConfig(name="yogi", tau=0.0)


def test_fedprox_proximal_term_two_full_batch_steps():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0, spec = flat_params(model)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    mu, lr = 0.5, 0.3
    plan = TrainingPlan(epochs=2, batch_size=0, lr=lr, prox_mu=mu)
    update = client_update(model, spec, w0, ClientData(x, y), plan)

    # reference: two plain gradient steps on loss + mu/2 ||w − w0||²
    def loss_at(w):
        weight, bias = w[:6].view(2, 3), w[6:]
        return nn.functional.cross_entropy(x @ weight.T + bias, y)

    w = w0.clone()
    for _ in range(2):
        w_req = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_at(w_req) + mu / 2 * (w_req - w0).square().sum(), w_req)
        w = w - lr * grad
    assert torch.allclose(update.delta, w - w0, atol=1e-6)
    plain = client_update(model, spec, w0, ClientData(x, y), TrainingPlan(epochs=2, batch_size=0, lr=lr))
    assert not torch.allclose(plain.delta, update.delta)  # the term did something
    assert update.delta.norm() < plain.delta.norm()       # and pulled towards the global model


@pytest.mark.parametrize("name, default", [("sgd", 1.0), ("adagrad", 0.1), ("adam", 0.01), ("yogi", 0.01)])
def test_each_optimizer_takes_its_own_rate_unless_one_is_set(name, default):
    # an adaptive step moves each weight by about its rate a round: FedAvg's 1.0 would throw the model away
    def first_step(**lr):
        opt = build_server_opt(ServerOptConfig(name=name, **lr))
        return opt.apply(W0.clone(), D1, opt.init(W0.clone()))[0]

    assert ServerOptConfig(name=name).lr == default == DEFAULT_LR[name]  # as config.toml records it
    assert torch.equal(first_step(), first_step(lr=default)) and not torch.equal(first_step(), first_step(lr=0.5))
    if name == "sgd":
        assert torch.equal(first_step(), W0 + D1)  # FedAvg: w + mean delta
    else:  # m = 0.1·Δ, v = τ² + (1 − β)Δ² (adagrad: β = 0), w + η m / (√v + τ)
        keep = 0.0 if name == "adagrad" else 0.99
        v = 1e-6 * (keep or 1) + (1 - keep) * 0.25
        assert abs(float(first_step()[0]) - (1 + default * 0.05 / (math.sqrt(v) + 1e-3))) < 1e-6
    with pytest.raises(ValueError, match=rf"server_opt.lr must be >= 0 \(0: {name}'s default, {default}\)"):
        ServerOptConfig(name=name, lr=-1.0)


def test_a_diverged_run_names_the_servers_rate_when_it_may_be_the_cause():
    assert ServerOptConfig().rates_to_lower() == "fl.plan.lr"
    assert ServerOptConfig(name="adam").rates_to_lower() == "fl.plan.lr or fl.server_opt.lr"
    assert ServerOptConfig(lr=3.0).rates_to_lower() == "fl.plan.lr or fl.server_opt.lr"
    assert ServerOptConfig(momentum=0.9).rates_to_lower() == "fl.plan.lr or fl.server_opt.lr"  # FedAvgM


def test_federated_buffers_take_the_clients_mean_under_any_server_optimizer(tmp_path):
    # round 1's updates are the same whatever the server does with them: the BatchNorm statistics of the new global
    # model are FedAvg's (w + mean delta) under adam; its parameters are adam's step
    from plait.federated.config import FederatedRunConfig
    from plait.federated.simulation import build_server
    from plait.settings.config import from_dict
    from tests_support import shapes_config

    after = {}
    for name in ("sgd", "adam"):
        server = build_server(from_dict(FederatedRunConfig, shapes_config(tmp_path, server_opt={"name": name})))
        try:
            after[name] = server.run_round(server.initial_state())[0].params
        finally:
            server.close()
        trained, start = server.spec.num_params, server.initial_params
    assert trained < len(start)  # the shapes net has BatchNorm: its running statistics follow the parameters
    assert torch.equal(after["adam"][trained:], after["sgd"][trained:])
    assert not torch.equal(after["adam"][trained:], start[trained:])  # they moved, by the clients' mean
    moved = (after["adam"][:trained] - start[:trained]).abs()
    assert 0.001 < float(moved.max()) <= 0.01  # round 1: |m| / (sqrt(v) + tau) < 1, so no weight moves more than η
