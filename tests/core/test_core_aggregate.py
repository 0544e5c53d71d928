import pytest
import torch

from plait.core.aggregate import RunningWeightedSum, weighted_mean


def test_weighted_mean_against_hand_computed():
    # (100·[1,2] + 300·[5,-2]) / 400 = [4, -1]
    updates = [torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])]
    assert torch.allclose(weighted_mean(updates, [100, 300]), torch.tensor([4.0, -1.0]))


def test_running_sum_holds_one_buffer_and_matches_stacked_mean():
    # Prepare: 7 updates of 1,000 values with weights 1..7
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(1000, generator=generator) for _ in range(7)]
    weights = [float(k) for k in range(1, 8)]
    # Execute: fold one at a time
    acc = RunningWeightedSum(1000)
    for x, w in zip(updates, weights):
        acc.add(x, w)
    # Assert
    reference = (torch.stack(updates) * torch.tensor(weights)[:, None]).sum(0) / sum(weights)
    assert torch.allclose(acc.mean(), reference, atol=1e-6)
    assert acc.count == 7 and acc.weight == 28.0


def test_errors_name_the_problem():
    acc = RunningWeightedSum(3)
    with pytest.raises(ValueError, match="no updates"):
        acc.mean()
    with pytest.raises(ValueError, match="shape"):
        acc.add(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        acc.add(torch.zeros(3), -1.0)
