"""Next-word prediction, the lecture's application: a word LSTM trained by FedAvg on Shakespeare's roles reports
top-1 and top-3 accuracy, and is read against each role training alone (issue 17)."""

from __future__ import annotations

import json

import torch

from plait.data.shakespeare_words import load_shakespeare_words
from plait.experiment.runs.fl_simulation import run_federated
from plait.federated.baselines import local_only
from plait.federated.config import FederatedRunConfig
from plait.federated.generate import generate, load_language_model
from plait.federated.simulation import build_server
from plait.federated.task import NextWord, Task, top_k_hits
from plait.settings.config import from_dict


def next_word_config(tmp_path, **fl) -> dict:
    """examples/next_word.toml, smaller: 8 roles of at most 150 examples, 4 rounds of 4 clients."""
    return {"run": {"name": "next_word", "root": str(tmp_path / "runs"), "seed": 0, "threads": 1},
            "model": {"name": "word_lstm"},
            "data": {"name": "shakespeare_words", "partition": "natural", "num_clients": 8,
                     "max_examples_per_client": 150, "cache_dir": str(tmp_path / "cache")},
            "fl": {"rounds": 4, "fraction": 0.5, "min_clients": 2, "task": "plait.federated.task:NextWord",
                   "plan": {"epochs": 1, "batch_size": 10, "lr": 1.0, "max_steps": 8}, **fl}}


def test_top_k_hits_counts_the_target_among_the_k_highest_logits():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.9, 0.0, 0.05, 0.8], [0.0, 0.1, 0.2, 0.3]])
    targets = torch.tensor([2, 1, 3])  # hits: top-3 only; none; top-1
    assert int(top_k_hits(logits, targets, 1)) == 1 and int(top_k_hits(logits, targets, 3)) == 2
    assert int(top_k_hits(logits, targets, 10)) == 3  # k past the number of classes: every row


def test_next_word_reports_top3_beside_accuracy_and_plain_classification_does_not():
    logits, targets = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    assert set(NextWord().eval_sums(logits, targets)) == {"loss", "accuracy", "top3_accuracy"}
    assert set(Task().eval_sums(logits, targets)) == {"loss", "accuracy"}


def test_fedavg_trains_a_word_lstm_on_the_roles(tmp_path):
    # Execute
    summary = run_federated(from_dict(FederatedRunConfig, next_word_config(tmp_path)), show_progress=False)
    # Assert: the loss falls; top-3 accuracy is at least top-1, both fractions
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_loss"] < records[0]["test_loss"] and records[-1]["train_loss"] < records[0]["train_loss"]
    for record in records:
        assert 0 <= record["test_accuracy"] <= record["test_top3_accuracy"] <= 1
    assert records[-1]["test_top3_accuracy"] > 0  # "the", "and", "i" at least
    # ... and the trained model writes words of its vocabulary, never its padding or out-of-vocabulary token
    sample = generate(load_language_model(summary.run_dir), "to be or not to", length=12, temperature=1.0, seed=0)
    vocabulary = load_shakespeare_words(cache_dir=tmp_path / "cache")["vocab"].tolist()
    assert len(sample.tokens) == 12 and all(w in vocabulary[2:] for w in sample.tokens)
    assert sample.text == "to be or not to " + " ".join(sample.tokens)


def test_each_role_alone_is_the_baseline(tmp_path):
    server = build_server(from_dict(FederatedRunConfig, next_word_config(tmp_path)))
    alone = local_only(server, rounds=4)
    assert alone["local_epochs"] == 2  # 4 rounds · C 0.5 · E 1
    assert 0 <= alone["local_accuracy_p10"] <= alone["local_accuracy_mean"] <= alone["local_accuracy_p90"] <= 1
