"""Shakespeare at the word level, one client per (play, role): next-word prediction, the lecture's application.

The roles' text comes from the same plays as the character-level set (data/shakespeare.py). Words are lower-cased
runs of letters (with inner apostrophes: "o'er", "i'll"); punctuation is dropped. The vocabulary is the
VOCAB_WORDS most frequent words of the training split (each role's text before its held-out tail), after two
special tokens: PAD (before a role's first word) and OOV (any other word). An example is the WINDOW previous words
-> the next word; examples whose next word is out of the vocabulary are left out, so that accuracy counts real
words only (as TFF's "accuracy without out-of-vocabulary" does).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from plait.data.cache import cached_arrays, path_key
from plait.data.shakespeare import parse_play, plays_dir

WINDOW = 10                   # previous words an example sees
VOCAB_WORDS = 10_000          # the most frequent training words (97% of Shakespeare's words)
SPECIALS = ("<pad>", "<oov>")
PAD, OOV = 0, 1
VOCAB_SIZE = len(SPECIALS) + VOCAB_WORDS  # core/models.py's word_lstm has this many inputs and outputs
TEST_SHARE = 0.1              # each role's last 10% of examples are the central test set (LEAF splits by time)
MIN_WORDS = 20                # a shorter role has too few examples for both splits
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def split_point(num_examples: int) -> tuple[int, int]:
    """(end of the training examples, start of the test examples) of a role with `num_examples`: the last
    TEST_SHARE are test; a gap of WINDOW examples between the two, so that no word is in both splits."""
    cut = max(1, int(num_examples * (1 - TEST_SHARE)))
    return max(1, cut - WINDOW), cut


def encode_words(words: list[str], vocabulary: np.ndarray) -> np.ndarray:
    """Token ids: a word's place in `vocabulary` (the loader's `vocab` array), OOV for any other word."""
    index = {word: i for i, word in enumerate(vocabulary.tolist())}
    return np.fromiter((index.get(w, OOV) for w in words), dtype=np.int32, count=len(words))


def _build(directory: Path) -> dict[str, np.ndarray]:
    files = sorted(directory.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no play (*.md) under {directory}")
    names, roles = [], []
    for path in files:
        for speaker, text in parse_play(path.read_text(encoding="utf-8")).items():
            words = words_of(text)
            if len(words) >= MIN_WORDS:
                names.append(f"{path.stem}/{speaker}")
                roles.append(words)
    counts: Counter[str] = Counter()
    for words in roles:
        counts.update(words[: split_point(len(words) - 1)[0] + 1])  # the words the training examples see
    # Ties broken alphabetically, so the vocabulary does not depend on the order the plays are read in.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:VOCAB_WORDS]
    vocabulary = np.array([*SPECIALS, *(word for word, _ in ranked)])
    tokens = [encode_words(words, vocabulary) for words in roles]
    offsets = np.cumsum([0] + [len(t) for t in tokens]).astype(np.int64)
    return {"tokens": np.concatenate(tokens), "offsets": offsets, "names": np.array(names), "vocab": vocabulary}


def load_shakespeare_words(path: str | Path | None = None, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Arrays: tokens (all roles' word ids), offsets [num_roles+1], names [num_roles], vocab [VOCAB_SIZE] (words;
    the specials first)."""
    directory = Path(path) if path else plays_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.path = {str(path)!r} is not a directory")
    key = "shakespeare_words" if not path else path_key("shakespeare_words", directory)
    return cached_arrays(f"{key}-v{VOCAB_WORDS}", lambda: _build(directory), cache_dir,
                         sources=[directory])


def role_examples(tokens: torch.Tensor, max_examples: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One role's (train_x [n, WINDOW], train_y [n], test_x, test_y): each word after the first, with the WINDOW
    words before it (PAD before the role's first word); `max_examples` caps the role's examples (0: all)."""
    padded = torch.cat([torch.full((WINDOW,), PAD, dtype=tokens.dtype), tokens])
    windows = padded.unfold(0, WINDOW + 1, 1)[1:]  # window j: the WINDOW words before word j+1, then word j+1
    if max_examples:
        windows = windows[:max_examples]
    train_end, test_start = split_point(len(windows))
    train, test = windows[:train_end], windows[test_start:]
    train, test = train[train[:, WINDOW] != OOV], test[test[:, WINDOW] != OOV]
    return train[:, :WINDOW], train[:, WINDOW], test[:, :WINDOW], test[:, WINDOW]
