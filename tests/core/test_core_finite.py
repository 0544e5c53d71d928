import pytest
import torch

from plait.core.finite import all_finite


@pytest.mark.parametrize("values, expected", [
    ([1.0, -2.0, 3.5], True),
    ([1.0, float("nan"), 3.0], False),
    ([1.0, float("inf")], False),
    ([float("-inf"), 2.0], False),
    ([float("inf"), float("-inf")], False),      # the sum is NaN, not a cancellation
    ([3e38, 3e38, -1.0], True),                  # finite values whose float32 sum overflows: the exact check
    ([3e38, 3e38, float("nan")], False),
    ([], True),
])
def test_all_finite_agrees_with_the_exact_check(values, expected):
    tensor = torch.tensor(values, dtype=torch.float32)
    assert all_finite(tensor) is expected
    assert bool(torch.isfinite(tensor).all()) is expected


def test_all_finite_takes_integer_tensors():
    assert all_finite(torch.arange(10)) is True
