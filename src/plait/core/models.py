"""Reference models from the FedAvg paper (McMahan et al. 2017), built by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def mnist_2nn(hidden: int = 200, num_classes: int = 10) -> nn.Module:
    """784-200-200-10 MLP with ReLU: 199,210 parameters."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """conv5x5·32 → pool → conv5x5·64 → pool → fc512 → fc10: 1,663,370 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


class NextTokenLSTM(nn.Module):
    """Next-token model: embedding, LSTM, logits over the vocabulary for the token after the sequence."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [batch, seq] int64
        out, _ = self.lstm(self.embed(tokens))
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


class CharLSTM(NextTokenLSTM):
    """Next-character model for Shakespeare: embedding 8, two LSTM layers of 256 (the FedAvg paper's)."""

    def __init__(self, vocab_size: int = 80, embed_dim: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__(vocab_size, embed_dim, hidden, layers)


class WordLSTM(NextTokenLSTM):
    """Next-word model for Shakespeare's roles: embedding 96, one LSTM layer of 256. The default vocabulary is
    data/shakespeare_words.py's: 10,000 words after its padding and out-of-vocabulary tokens."""

    def __init__(self, vocab_size: int = 10_002, embed_dim: int = 96, hidden: int = 256, layers: int = 1):
        super().__init__(vocab_size, embed_dim, hidden, layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"2nn": mnist_2nn, "cnn": mnist_cnn, "char_lstm": CharLSTM,
                                               "word_lstm": WordLSTM}
LANGUAGE_MODELS = ("char_lstm", "word_lstm")  # the presets `plait generate` samples text from


def build_model(name: str, **kwargs: Any) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model = {name!r} is not known; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
