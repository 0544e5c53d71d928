import numpy as np
import pytest

from plait.data import partition


def _labels(num_per_class=600, num_classes=10):
    return np.repeat(np.arange(num_classes), num_per_class)


def _assert_exact_cover(parts, num_examples):
    joined = np.concatenate(parts)
    assert len(joined) == num_examples and len(np.unique(joined)) == num_examples  # every example once


def test_iid_equal_sizes_and_balanced_labels():
    labels = _labels()
    parts = partition.iid(len(labels), 10, seed=1)
    _assert_exact_cover(parts, len(labels))
    assert {len(p) for p in parts} == {600}
    hist = partition.label_histograms(labels, parts, 10)
    assert hist.min() > 30 and hist.max() < 95  # ~60 per class per client, never missing a class


def test_shards_mcmahan_two_labels_per_client():
    # Prepare: MNIST-like 60,000 examples → 200 shards of 300, 2 per client
    labels = _labels(6000)
    # Execute
    parts = partition.shards(labels, 100, shards_per_client=2, seed=0)
    # Assert
    _assert_exact_cover(parts, 60_000)
    assert {len(p) for p in parts} == {600}
    hist = partition.label_histograms(labels, parts, 10)
    assert ((hist > 0).sum(axis=1) <= 2).all()  # a shard never straddles labels here (6000 = 20 shards/class)
    assert (hist % 300 == 0).all()


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels()
    def mean_classes(alpha):
        parts = partition.dirichlet(labels, 20, alpha, seed=3)
        _assert_exact_cover(parts, len(labels))
        return (partition.label_histograms(labels, parts, 10) > 0).sum(axis=1).mean()
    assert mean_classes(0.05) < 4 < mean_classes(100.0)
    assert mean_classes(100.0) == 10


def test_quantity_skew_sizes_vary_labels_stay_mixed():
    labels = _labels()
    parts = partition.quantity_skew(len(labels), 10, alpha=0.5, seed=2, min_size=5)
    _assert_exact_cover(parts, len(labels))
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5 and sizes.max() > 3 * sizes.min()
    big = parts[int(sizes.argmax())]
    assert len(np.unique(labels[big])) == 10


def test_natural_one_client_per_group_in_order_of_appearance():
    groups = np.array(["lear", "fool", "lear", "kent", "fool"])
    parts = partition.natural(groups)
    assert [p.tolist() for p in parts] == [[0, 2], [1, 4], [3]]


@pytest.mark.parametrize("make", [
    lambda seed: partition.iid(1000, 7, seed),
    lambda seed: partition.shards(_labels(100), 5, 2, seed),
    lambda seed: partition.dirichlet(_labels(100), 5, 0.3, seed),
    lambda seed: partition.quantity_skew(1000, 7, 1.0, seed),
])
def test_deterministic_given_seed(make):
    a, b, c = make(5), make(5), make(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="alpha"):
        partition.dirichlet(_labels(), 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition.iid(100, 0, seed=0)
