"""Clients' data made when a client is asked for (data/lazy.py, data/partition_spec.py): exact lazy partitions give
the eager split, draws are seeded per client, a folder of client files is read file by file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.data import lazy, partition
from plait.data.federated import DataConfig, federated_from_user_data, load_federated
from plait.data.partition_spec import DirichletDraws, IidDraws, IidShares, ShardDeal, ShardDraws, partition_spec
from plait.data.user import user_data_from

LABELS = np.random.default_rng(3).integers(0, 10, 1000)


@pytest.mark.parametrize(("num_clients", "seed"), [(7, 0), (100, 5), (1000, 1)])
def test_exact_lazy_partitions_are_the_eager_ones(num_clients, seed):
    iid, shards = IidShares(len(LABELS), num_clients, seed), ShardDeal(LABELS, num_clients // 2 or 1, 2, seed)
    for k, part in enumerate(partition.iid(len(LABELS), num_clients, seed)):
        assert np.array_equal(iid.indices(k), part) and iid.size(k) == len(part)
    for k, part in enumerate(partition.shards(LABELS, num_clients // 2 or 1, 2, seed)):
        assert np.array_equal(shards.indices(k), part) and shards.size(k) == len(part)


def test_without_a_held_out_share_lazy_clients_hold_the_eager_clients_data():
    x, y = torch.randn(600, 3), torch.from_numpy(LABELS[:600])
    eager = federated_from_user_data(DataConfig(num_clients=40, partition="shards", materialise="eager"),
                                     user_data_from((x, y), "data"))
    lazy_data = federated_from_user_data(DataConfig(num_clients=40, partition="shards", materialise="lazy"),
                                         user_data_from((x, y), "data"))
    assert isinstance(lazy_data, lazy.LazyFederatedData) and lazy_data.num_classes == eager.num_classes
    for k in (0, 17, 39):
        assert torch.equal(lazy_data.client_train(k)[0], eager.client_train(k)[0])
        assert torch.equal(lazy_data.client_train(k)[1], eager.client_train(k)[1])
        assert lazy_data.num_examples(k) == eager.num_examples(k)


def test_draws_are_seeded_per_client_and_may_outnumber_the_examples():
    draws = IidDraws(len(LABELS), 10**6, 30, seed=4)
    first, again, other = draws.indices(999_999), IidDraws(len(LABELS), 10**6, 30, seed=4).indices(999_999), \
        draws.indices(5)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert len(np.unique(first)) == 30 and first.min() >= 0 and first.max() < len(LABELS)
    shards = ShardDraws(LABELS, 10**6, 2, 40, seed=0).indices(123_456)
    assert len(shards) == 40 and len(np.unique(LABELS[shards])) <= 4  # two label-sorted shards: few classes
    skewed = [DirichletDraws(LABELS, 10**6, 0.05, 50, seed=0).indices(k) for k in range(20)]
    assert all(len(s) == 50 for s in skewed)
    assert np.mean([len(np.unique(LABELS[s])) for s in skewed]) < 3  # small alpha: each client sees few classes


def test_a_held_out_share_is_split_per_client():
    x, y = torch.randn(1000, 3), torch.from_numpy(LABELS)
    config = DataConfig(num_clients=200_000, partition="iid", examples_per_client=20, eval_fraction=0.25)
    data = federated_from_user_data(config, user_data_from((x, y), "data"))
    train_x, _ = data.client_train(199_999)
    eval_x, _ = data.client_eval(199_999)
    assert data.num_clients == 200_000 and data.num_examples(199_999) == 15 and len(eval_x) == 5
    assert data.num_examples(7) == len(data.client_train(7)[1])  # the size without the draw, and with it
    rows = {tuple(r.tolist()) for r in train_x}
    assert not rows & {tuple(r.tolist()) for r in eval_x}
    with pytest.raises(ValueError, match="client 200000: data.num_clients is 200000"):
        data.client_train(200_000)


def test_partitions_without_a_lazy_form_say_which_setting_to_change():
    with pytest.raises(ValueError, match="data.examples_per_client"):
        partition_spec("iid", LABELS, 5000, shards_per_client=2, alpha=0.5, examples_per_client=0, seed=0)
    with pytest.raises(ValueError, match="data.examples_per_client"):
        partition_spec("dirichlet", LABELS, 50, shards_per_client=2, alpha=0.5, examples_per_client=0, seed=0)
    with pytest.raises(ValueError, match="'quantity' has no lazy form"):
        partition_spec("quantity", LABELS, 50, shards_per_client=2, alpha=0.5, examples_per_client=10, seed=0)
    with pytest.raises(ValueError, match="data.materialise = 'auto' or 'lazy'"):
        DataConfig(examples_per_client=10, materialise="eager")
    assert DataConfig(num_clients=100_001).lazy and not DataConfig(num_clients=100_000).lazy
    assert DataConfig(num_clients=10, examples_per_client=5).lazy


def test_a_folder_of_client_files_is_read_file_by_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for k in range(6):
        np.savez(tmp_path / f"client-{k}.npz", x=rng.normal(size=(8 + k, 3)).astype(np.float32),
                 y=rng.integers(0, 3, 8 + k))
    (tmp_path / "client-4.npz").write_bytes(b"not a zip")  # never asked for below: must not stop the run
    monkeypatch.setattr(lazy, "CLASS_SAMPLE", 2)
    opened: list[str] = []
    real = lazy.labelled_file
    monkeypatch.setattr(lazy, "labelled_file", lambda path, what: opened.append(path.name) or real(path, what))
    data = load_federated(DataConfig(source=str(tmp_path), num_clients=6, materialise="lazy"))
    assert opened == ["client-0.npz", "client-1.npz"]  # the number of classes, from the first CLASS_SAMPLE
    assert data.num_examples(5) == 13 and len(data.client_train(5)[1]) == 13 and opened[-1] == "client-5.npz"
    with pytest.raises(ValueError, match="client-4.npz"):
        data.client_train(4)
    with pytest.raises(ValueError, match=r"client-6\.npz', 'client-7\.npz'\] are missing"):
        load_federated(DataConfig(source=str(tmp_path), num_clients=8, materialise="lazy"))


def test_per_client_sets_made_lazily_are_the_same_clients():
    rng = np.random.default_rng(1)
    sets = [(torch.randn(3 + k, 2), torch.from_numpy(rng.integers(0, 4, 3 + k))) for k in range(5)]
    eager = federated_from_user_data(DataConfig(num_clients=4, materialise="eager"), user_data_from(sets, "data"))
    lazy_data = federated_from_user_data(DataConfig(num_clients=4, materialise="lazy"), user_data_from(sets, "data"))
    assert lazy_data.num_clients == 4 and lazy_data.num_classes == eager.num_classes
    for k in range(4):
        assert torch.equal(lazy_data.client_train(k)[0], sets[k][0]) and torch.equal(eager.client_train(k)[0],
                                                                                     sets[k][0])
