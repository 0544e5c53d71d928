"""`plait.parallel.split_pipeline`: a user's own nn.Sequential cut into 2 stages on 2 real gloo ranks, stepped from
the user's loop under GPipe and 1F1B, trains exactly as one process training the whole model on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import split_pipeline
from plait.parallel.launch import spawn_ranks

STEPS, BATCH, LR, MOMENTUM = 5, 12, 0.1, 0.9
# name: (split_pipeline keywords, expected boundaries)
CASES = {
    "gpipe_balanced": (dict(schedule="gpipe", stages=2, micro_batches=4), None),
    "1f1b_split_at_3": (dict(schedule="1f1b", boundaries=[3], micro_batches=3), [3]),
}


def user_sequential() -> nn.Sequential:
    torch.manual_seed(2)  # every rank builds the same model
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 4))


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return torch.randn(STEPS, BATCH, 10, generator=gen), torch.randint(0, 4, (STEPS, BATCH), generator=gen)


def _user_loop(rank: int, world_size: int) -> dict:
    x, y = _batches()
    out: dict = {}
    for name, (kwargs, _) in CASES.items():
        pipe = split_pipeline(user_sequential(), loss_fn=F.cross_entropy, **kwargs)
        opt = torch.optim.SGD(pipe.parameters(), lr=LR, momentum=MOMENTUM)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = pipe.step(x[step], y[step] if pipe.is_last else None)  # targets matter on the last stage only
            opt.step()
            losses.append(None if loss is None else float(loss))
        logits = pipe.predict(x[0] if pipe.is_first else None, batch_size=BATCH)
        # numpy: a tensor would travel to the parent as shared memory, gone once this rank exits
        out[name] = {"params": torch.cat([p.detach().reshape(-1) for p in pipe.parameters()]).numpy(),
                     "losses": losses, "boundaries": pipe.boundaries,
                     "logits": None if logits is None else logits.numpy()}
    try:
        split_pipeline(user_sequential(), loss_fn=F.cross_entropy, stages=3)
    except ValueError as err:
        out["three_stages_on_two_ranks"] = str(err)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(_user_loop, 2, timeout_s=180)


def _reference() -> tuple[torch.Tensor, list[float], torch.Tensor]:
    x, y = _batches()
    model = user_sequential()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[step]), y[step])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        logits = model(x[0])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), losses, logits


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_from_a_user_sequential_matches_single_process_training(ranks, name):
    params, losses, logits = _reference()
    first, last = ranks[0][name], ranks[1][name]
    expected_bounds = CASES[name][1]
    assert first["boundaries"] == last["boundaries"] and (expected_bounds is None
                                                          or first["boundaries"] == expected_bounds)
    stitched = torch.cat([torch.from_numpy(first["params"]), torch.from_numpy(last["params"])])  # stage 0, stage 1
    torch.testing.assert_close(stitched, params, atol=1e-5, rtol=0)
    assert first["losses"] == [None] * STEPS and first["logits"] is None  # the loss lives on the last stage
    assert last["losses"] == pytest.approx(losses, abs=1e-5)
    torch.testing.assert_close(torch.from_numpy(last["logits"]), logits, atol=1e-5, rtol=0)


def test_more_stages_than_ranks_names_the_setting(ranks):
    assert "split_pipeline(stages=3) needs 3 ranks" in ranks[0]["three_stages_on_two_ranks"]


@pytest.mark.parametrize(("kwargs", "named"), [
    (dict(schedule="zigzag"), "split_pipeline(schedule='zigzag')"),
    (dict(micro_batches=0), "split_pipeline(micro_batches=0)"),
])
def test_a_wrong_setting_names_it(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        split_pipeline(user_sequential(), loss_fn=F.cross_entropy, **kwargs)
