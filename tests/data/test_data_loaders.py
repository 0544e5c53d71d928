import io
import pickle

import numpy as np
import pytest
import torch

from plait.data.federated import DataConfig, load_federated
from plait.data.idx import read_idx, write_idx
from plait.data.images import _NumpyOnlyUnpickler, load_image_set
from plait.data.shakespeare import VOCAB, encode, parse_play

# Canonical MNIST label counts (LeCun & Cortes).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_from_package_is_the_canonical_set(tmp_path):
    arrays = load_image_set("mnist", cache_dir=tmp_path)
    assert arrays["train_x"].shape == (60_000, 28, 28) and arrays["train_x"].dtype == np.uint8
    assert np.bincount(arrays["train_y"]).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(arrays["test_y"]).tolist() == MNIST_TEST_COUNTS
    assert list(tmp_path.glob("mnist-*/train_x.npy"))  # cached; the second load reads the .npy files
    again = load_image_set("mnist", cache_dir=tmp_path)
    assert np.array_equal(again["train_x"], arrays["train_x"])


def test_idx_directory_round_trip(tmp_path):
    # Prepare: a user's own copy of an IDX data set (gzipped train, plain test)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:5])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:5])
    # Execute
    arrays = load_image_set("mnist", path=tmp_path, cache_dir=tmp_path / "cache")
    # Assert
    assert np.array_equal(arrays["train_x"], images) and np.array_equal(arrays["test_y"], labels[:5])


def test_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx"
    write_idx(path, np.zeros((4, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(path)


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    payload = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*print"):
        _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    ok = pickle.dumps(np.arange(3), protocol=2)
    assert _NumpyOnlyUnpickler(io.BytesIO(ok)).load().tolist() == [0, 1, 2]


def test_missing_data_path_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_image_set("mnist", path=tmp_path / "nowhere")


def test_parse_play_speakers_and_stage_directions():
    text = ("# Play\n\n## ACT I\n\n_Enter LEAR_\n\n**LEAR**  \nNothing will come  \nof nothing.\n\n"
            "**FOOL**  \nNuncle!\n_Exit_\n")
    assert parse_play(text) == {"LEAR": "Nothing will come of nothing.", "FOOL": "Nuncle!"}
    assert VOCAB[encode("Ab")[0]] == "A" and VOCAB[encode("Ab")[1]] == "b"


def test_shakespeare_natural_clients_are_roles(tmp_path):
    data = load_federated(DataConfig(name="shakespeare", partition="natural", num_clients=5, cache_dir=str(tmp_path)))
    assert data.num_clients == 5
    x, y = data.client_train(0)
    assert x.shape[1] == 80 and x.dtype == torch.int64 and len(x) == len(y) > 0
    assert torch.equal(x[1, :-1], x[0, 1:])  # sliding windows of one role's text
    assert len(data.test_y) > 0


def test_federated_mnist_eval_split(tmp_path):
    data = load_federated(DataConfig(num_clients=10, partition="iid", eval_fraction=0.2, cache_dir=str(tmp_path)))
    x, y = data.client_train(3)
    ex, ey = data.client_eval(3)
    assert len(y) == 4800 and len(ey) == 1200 and x.shape[1:] == (1, 28, 28)
    assert abs(float(x.mean())) < 0.2  # normalised


def test_shakespeare_more_clients_than_roles_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.num_clients"):
        load_federated(DataConfig(name="shakespeare", partition="natural", num_clients=100_000,
                                  cache_dir=str(tmp_path)))


def test_unknown_characters_become_spaces():
    assert encode("a\u2014b").tolist() == [VOCAB.index("a"), 0, VOCAB.index("b")]


def test_every_client_keeps_a_training_example(tmp_path):
    data = load_federated(DataConfig(num_clients=60_000, partition="iid", eval_fraction=0.6, cache_dir=str(tmp_path)))
    assert all(data.num_examples(c) >= 1 for c in (0, 1, 59_999))


def test_federated_mnist_keeps_its_images_as_bytes_and_hands_clients_normalised_floats(tmp_path):
    """The training images stay uint8 (a quarter of float32's memory); a client's are normalised as they are asked
    for, exactly as the whole set would have been (each pixel: /255, -mean, /std in float32)."""
    data = load_federated(DataConfig(name="mnist", num_clients=10, partition="iid", eval_fraction=0.1))
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (28, 28)
    raw = load_image_set("mnist", None, None)["train_x"]
    for client in (0, 7):
        for x, _ in (data.client_train(client), data.client_eval(client)):
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
            pixels = torch.from_numpy(raw).float() / 255  # the rows are some of MNIST's: find each by its pixels
            first = int(torch.nonzero(((x[0, 0] * 0.3081 + 0.1307) - pixels).abs().amax(dim=(1, 2)) < 1e-5)[0])
            assert torch.equal(x[0, 0], ((pixels[first] - torch.tensor(0.1307)) / torch.tensor(0.3081)))


def test_raw_images_laid_out_when_first_asked_give_every_client_its_own_rows():
    """With `convert_x`, each client's rows are gathered when it is first asked for (not all at start): every
    client's training and held-out examples, asked in any order and again, are the rows the client-major layout of
    the whole set gives, including where an empty held-out run starts where the next client's begins."""
    from plait.data.federated import FederatedData
    from plait.data.image_tensors import images_to_tensor

    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, size=(50, 4, 4), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, size=50))
    # client 1 holds one example (no held-out share: an empty run); 5 examples belong to no client
    parts = [np.sort(p) for p in np.split(rng.permutation(50)[:45], [12, 13, 30])]
    test_x, test_y = images_to_tensor(images[:4]), labels[:4]

    def made(convert):
        return FederatedData(images, labels, test_x, test_y, parts, eval_fraction=0.25, seed=0, num_classes=10,
                             convert_x=convert)

    lazy, eager = made(images_to_tensor), made(None)
    assert len(lazy.client_eval(1)[1]) == 0 and len(lazy.client_eval(2)[1]) > 0
    for client, held_out in [(1, True), (2, True), (0, False), (3, True), (2, False), (1, False), (0, True)] * 2:
        got = lazy.client_eval(client) if held_out else lazy.client_train(client)
        want = eager.client_eval(client) if held_out else eager.client_train(client)
        assert torch.equal(got[0], images_to_tensor(want[0])) and torch.equal(got[1], want[1])
        rows = {tuple(r.flatten().tolist()) for r in want[0]}  # the client's own images, none of another's
        assert rows <= {tuple(images[i].flatten().tolist()) for i in parts[client]}
        if not held_out:  # the stored rows as they are, and the conversion whoever trains the client applies
            raw, raw_y, convert = lazy.client_train_raw(client)
            assert raw.dtype == torch.uint8 and torch.equal(raw, want[0]) and torch.equal(raw_y, want[1])
            assert convert is images_to_tensor and eager.client_train_raw(client)[2] is None
