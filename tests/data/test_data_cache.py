"""The decoded-arrays cache (data/cache.py): read back on the second load, rebuilt when damaged or when its source
changed, off on request; and the image sets' float tensors, the same with and without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plait.data import partition
from plait.data.cache import cached_arrays
from plait.data.federated import DataConfig, load_federated
from plait.data.image_tensors import MEAN, STD, images_to_tensor
from plait.data.images import load_image_set


class Counting:
    """A build function that says how often it ran."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.arrays = {"x": rng.integers(0, 256, (50, 4, 4), dtype=np.uint8), "y": rng.integers(0, 10, 50),
                       "names": np.array(["a", "bb"])}
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {k: v.copy() for k, v in self.arrays.items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(b"the data set")
    return path


def test_second_load_reads_the_cache_memory_mapped(tmp_path, source):
    build = Counting()
    first = cached_arrays("set", build, tmp_path / "cache", sources=[source])
    second = cached_arrays("set", build, tmp_path / "cache", sources=[source])
    assert build.calls == 1 and _same(first, build.arrays) and _same(second, build.arrays)
    assert isinstance(second["x"].base, np.memmap)  # mapped, not read into memory
    second["x"][0] = 7  # copy-on-write: the caller may change its arrays, the file stays as it was
    assert _same(cached_arrays("set", build, tmp_path / "cache", sources=[source]), build.arrays)
    assert build.calls == 1


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop a file", "garble the manifest"])
def test_a_damaged_cache_is_rebuilt(tmp_path, source, damage):
    build = Counting()
    cached_arrays("set", build, tmp_path / "cache", sources=[source])
    (folder,) = (tmp_path / "cache").iterdir()
    x = folder / "x.npy"
    if damage == "flip a byte":
        raw = bytearray(x.read_bytes())
        raw[-5] ^= 0xFF
        x.write_bytes(bytes(raw))
    elif damage == "truncate":
        x.write_bytes(x.read_bytes()[:-10])
    elif damage == "drop a file":
        (folder / "y.npy").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    again = cached_arrays("set", build, tmp_path / "cache", sources=[source])
    assert build.calls == 2 and _same(again, build.arrays)
    assert _same(cached_arrays("set", build, tmp_path / "cache", sources=[source]), build.arrays)
    assert build.calls == 2  # the rebuilt cache is read back
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temporary folder left


def test_a_changed_source_builds_anew_and_the_old_cache_goes(tmp_path, source):
    cached_arrays("set", Counting(0), tmp_path / "cache", sources=[source])
    (old,) = (tmp_path / "cache").iterdir()
    source.write_bytes(b"a newer copy of the data set")
    build = Counting(1)
    arrays = cached_arrays("set", build, tmp_path / "cache", sources=[source])
    assert build.calls == 1 and _same(arrays, build.arrays)
    (new,) = (tmp_path / "cache").iterdir()
    assert new != old and json.loads((new / "manifest.json").read_text())["sources"][0][1] == source.stat().st_size
    elsewhere = tmp_path / "copy.bin"  # the same data set from another place (another virtual environment)
    elsewhere.write_bytes(b"the data set")
    cached_arrays("set", Counting(0), tmp_path / "cache", sources=[elsewhere])
    assert len(list((tmp_path / "cache").iterdir())) == 2  # each keeps its own cache


def test_the_cache_can_be_turned_off(tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build = Counting()
    for _ in range(2):
        assert _same(cached_arrays("set", build, "off", sources=[source]), build.arrays)
    monkeypatch.setenv("PLAIT_CACHE", "off")
    assert _same(cached_arrays("set", build, None, sources=[source]), build.arrays)
    assert build.calls == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["source.bin"]


def test_a_cache_that_cannot_be_written_warns_and_the_arrays_still_come(tmp_path, source):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    build = Counting()
    with pytest.warns(UserWarning, match="could not be written.*data.cache_dir"):
        arrays = cached_arrays("set", build, blocked / "cache", sources=[source])
    assert _same(arrays, build.arrays)


def test_plait_cache_names_the_default_folder(tmp_path, source, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "elsewhere"))
    cached_arrays("set", Counting(), None, sources=[source])
    assert [p.name.split("-")[0] for p in (tmp_path / "elsewhere").iterdir()] == ["set"]


def test_images_to_tensor_rounds_as_torch_does():
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8).repeat(3, axis=0)  # every value, 12 images
    expected = ((torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD).unsqueeze(1)
    assert torch.equal(images_to_tensor(pixels), expected)
    order = np.array([5, 0, 11, 5])
    assert torch.equal(images_to_tensor(torch.from_numpy(pixels), order), expected[order])
    assert images_to_tensor(pixels[:0]).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(pixels.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_images_to_tensor_splits_a_large_set_among_torch_threads_with_the_same_values(threads):
    """A set of several thousand images is converted by torch's threads, each its own range of blocks (a range
    that ends inside a block, and a gathered order, included): every value as one thread makes it."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7000, 6, 6), dtype=np.uint8)  # 14 blocks, the last one short
    order = rng.permutation(7000)[:6500]
    expected = ((torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD).unsqueeze(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(images_to_tensor(pixels), expected)
        assert torch.equal(images_to_tensor(pixels, order), expected[order])
    finally:
        torch.set_num_threads(before)


def test_mnist_clients_are_the_same_with_and_without_the_cache(tmp_path):
    config = DataConfig(name="mnist", num_clients=20, cache_dir=str(tmp_path / "cache"))
    built, cached = load_federated(config), load_federated(config)  # the second from the cache
    fresh = load_federated(DataConfig(name="mnist", num_clients=20, cache_dir="off"))
    for other in (cached, fresh):
        assert torch.equal(built.test_x, other.test_x) and torch.equal(built.test_y, other.test_y)
        for client in (0, 7, 19):
            assert all(torch.equal(a, b) for a, b in zip(built.client_train(client), other.client_train(client)))
    # the float images are torch's (x / 255 - MEAN) / STD of the client's raw pixels (its shards, in order)
    raw = load_image_set("mnist", cache_dir=tmp_path / "cache")
    rows = np.sort(partition.shards(raw["train_y"], 20, config.shards_per_client, config.seed)[3])
    x, y = built.client_train(3)
    expected = ((torch.from_numpy(raw["train_x"][rows]).float() / 255.0 - MEAN) / STD).unsqueeze(1)
    assert torch.equal(x, expected) and torch.equal(y, torch.from_numpy(raw["train_y"][rows]))
