"""`plait generate RUN_DIR`: text sampled from a trained character or word model, repeatable with a seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.data.shakespeare import VOCAB
from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.config import FederatedRunConfig
from plait.federated.generate import generate, load_language_model
from plait.runtime.checkpoint import WEIGHTS_FILE
from plait.settings.config import from_dict
from tests_support import shapes_config

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """A char-LSTM trained for 2 short rounds on 4 roles."""
    root = tmp_path_factory.mktemp("char")
    raw = {"run": {"name": "chars", "root": str(root / "runs"), "seed": 0, "threads": 1},
           "model": {"name": "char_lstm"},
           "data": {"name": "shakespeare", "partition": "natural", "num_clients": 4, "max_examples_per_client": 100,
                    "cache_dir": str(root / "cache")},
           "fl": {"rounds": 2, "fraction": 0.5, "min_clients": 2, "plan": {"batch_size": 10, "lr": 1.0,
                                                                            "max_steps": 2}}}
    return run_federated(from_dict(FederatedRunConfig, raw), show_progress=False).run_dir


def _plait(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_a_sample_has_the_asked_length_in_the_models_vocabulary_and_repeats_with_its_seed(char_run):
    # Prepare
    lm = load_language_model(char_run)
    # Execute
    first, again = (generate(lm, "ROMEO. ", length=40, temperature=1.0, seed=3) for _ in range(2))
    other = generate(lm, "ROMEO. ", length=40, temperature=1.0, seed=4)
    greedy = [generate(lm, "ROMEO. ", length=40, temperature=0, seed=s) for s in (1, 2)]
    # Assert
    assert len(first.tokens) == 40 and all(ch in VOCAB for ch in first.tokens)
    assert first.text == "ROMEO. " + "".join(first.tokens)
    assert first == again and other.tokens != first.tokens  # the seed decides the draws
    assert greedy[0] == greedy[1]  # temperature 0: the arg-max, whatever the seed


def test_the_command_prints_the_prompt_and_its_continuation(char_run):
    result = _plait("generate", str(char_run), "--prompt", "To be", "--length", "25", "--seed", "7")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be") and len(result.stdout.rstrip("\n")) == len("To be") + 25


def test_a_run_that_stopped_before_writing_its_weights_samples_from_its_checkpoint(char_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "checkpoint.pt"):
        (copy / name).write_bytes((char_run / name).read_bytes())
    assert not (copy / WEIGHTS_FILE).exists()

    from_checkpoint = generate(load_language_model(copy), length=30, temperature=0)

    assert from_checkpoint == generate(load_language_model(char_run), length=30, temperature=0)


def test_a_run_that_is_not_a_language_model_or_no_run_at_all_is_a_clear_error(tmp_path):
    images = run_federated(from_dict(FederatedRunConfig, shapes_config(tmp_path, rounds=1)),
                           show_progress=False).run_dir

    not_text = _plait("generate", str(images))
    missing = _plait("generate", str(tmp_path / "runs" / "nowhere"))

    assert not_text.returncode == 2 and "not a language model" in not_text.stderr and not not_text.stdout
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


def test_bad_sampling_settings_name_the_option(char_run):
    lm = load_language_model(char_run)
    for options, option in (({"temperature": -1.0}, "--temperature"), ({"length": -1}, "--length"),
                            ({"prompt": ""}, "--prompt")):
        with pytest.raises(ValueError, match=option):
            generate(lm, **options)
