"""`plait.parallel.wrap` around a user's own module, in a user's own loop, on 2 real gloo ranks: each rank trains
on half of every batch, and the weights after N steps equal one process's SGD on the whole batch.

One spawn runs every case one after another; the parent computes the single-process reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import wrap
from plait.parallel.launch import spawn_ranks

STEPS, BATCH, LR, MOMENTUM = 6, 16, 0.1, 0.9

# name: (wrap keywords, micro-batches per rank and step, tolerance against the reference)
CASES = {
    "native": (dict(allreduce="native"), 1, 1e-5),
    "ring": (dict(allreduce="ring"), 1, 1e-5),
    "tree": (dict(allreduce="tree"), 1, 1e-5),
    "naive": (dict(allreduce="naive"), 1, 1e-5),
    "ring_no_sync_accumulation": (dict(allreduce="ring"), 2, 1e-5),
    "native_no_overlap": (dict(allreduce="native", overlap=False), 1, 1e-5),
    "fp16_compression": (dict(allreduce="ring", compression="fp16"), 1, 1e-2),  # lossy on the wire
}


class UserNet(nn.Module):
    """A user's own module: not a Plait preset, with a LayerNorm and a layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.body(x))
        return self.head(torch.relu(self.mix(torch.relu(self.mix(h)))))


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return torch.randn(STEPS, BATCH, 12, generator=gen), torch.randint(0, 3, (STEPS, BATCH), generator=gen)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _user_loop(rank: int, world_size: int) -> dict:
    x, y = _batches()
    out = {}
    for name, (kwargs, micro_batches, _) in CASES.items():
        torch.manual_seed(5 + rank)  # each rank builds other weights: wrap starts them all from rank 0's
        model = wrap(UserNet(), bucket_mb=0.001, **kwargs)  # ~1 KiB buckets: several per step
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        for step in range(STEPS):
            mine_x, mine_y = x[step, rank::world_size], y[step, rank::world_size]  # this rank's half
            opt.zero_grad()
            parts = list(zip(mine_x.chunk(micro_batches), mine_y.chunk(micro_batches)))
            for i, (xb, yb) in enumerate(parts):
                if i < len(parts) - 1:
                    with model.no_sync():  # accumulate locally; the last backward syncs the sum
                        (F.cross_entropy(model(xb), yb) / micro_batches).backward()
                else:
                    (F.cross_entropy(model(xb), yb) / micro_batches).backward()
            opt.step()
        # numpy: a tensor would travel to the parent as shared memory, gone once this rank exits
        out[name] = {"params": _flat(model.module).numpy(), "bytes": model.bytes_moved()}
        model.close()
    # a second backward through one forward must fail, never sync twice (or skip the sync) in silence
    model = wrap(UserNet())
    loss = model(x[0]).sum()
    loss.backward(retain_graph=True)
    try:
        loss.backward()
        out["second_backward"] = None
    except RuntimeError as err:
        out["second_backward"] = str(err)
    model.close()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(_user_loop, 2, timeout_s=180)


def _reference() -> torch.Tensor:
    """One process, rank 0's initial weights, the whole batch every step."""
    x, y = _batches()
    torch.manual_seed(5)
    model = UserNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
    return _flat(model)


@pytest.mark.parametrize("name", list(CASES))
def test_wrapped_user_module_matches_single_process_sgd(ranks, name):
    tolerance = CASES[name][2]
    first, second = torch.from_numpy(ranks[0][name]["params"]), torch.from_numpy(ranks[1][name]["params"])
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # replicas never drift
    torch.testing.assert_close(first, _reference(), atol=tolerance, rtol=0)
    sent, received = ranks[0][name]["bytes"]
    assert sent > 0 and received > 0


def test_a_second_backward_through_one_forward_is_an_error(ranks):
    for rank in ranks:
        assert "second backward" in rank["second_backward"] and "no_sync()" in rank["second_backward"]


@pytest.mark.parametrize(("kwargs", "named"), [
    (dict(allreduce="rign"), "wrap(allreduce='rign')"),
    (dict(bucket_mb=0), "wrap(bucket_mb=0)"),
    (dict(compression="zip"), "wrap(compression='zip')"),
    (dict(comm_hook="fp8"), "wrap(comm_hook='fp8')"),
    (dict(compression="fp16", comm_hook="powersgd"), "both compress"),
])
def test_a_wrong_setting_names_it(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        wrap(UserNet(), **kwargs)


def test_wrap_without_a_process_group_says_what_to_do():
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrap(UserNet())
