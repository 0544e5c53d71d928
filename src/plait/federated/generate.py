"""Text sampled from a trained character or word model (`plait generate RUN_DIR`).

A run trained on `data.name = "shakespeare"` (characters) or `"shakespeare_words"` (words) predicts the next token
from a window of the previous ones. Sampling feeds it the prompt, draws the next token from its softmax at a
temperature (the arg-max at temperature 0: greedy), appends it, and repeats with the window moved on. The draws
come from a generator seeded by `seed`, so a sample repeats exactly.

The weights are the run's `model.safetensors` (written at the end of every run), or its last checkpoint for a run
that stopped early.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plait.data import shakespeare_words as words
from plait.data.shakespeare import SEQ_LEN, VOCAB, encode
from plait.federated.components import build_model
from plait.federated.config import FederatedRunConfig
from plait.federated.export import state_dict_of
from plait.federated.weights import flat_model_state
from plait.runtime.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, load_checkpoint
from plait.settings.config import from_dict, load_toml

DEFAULT_PROMPT = "To be, or not to be"
TEXT_SETS = {"shakespeare": "characters", "shakespeare_words": "words"}


@dataclass(slots=True)
class LanguageModel:
    """A trained next-token model and its tokens: `tokens[i]` is the text of id i."""

    model: torch.nn.Module
    level: str                       # "characters" or "words"
    tokens: list[str]
    window: int                      # how many previous tokens the model saw in training
    never: tuple[int, ...] = ()      # ids never sampled (the word model's padding and out-of-vocabulary tokens)

    def encode(self, text: str) -> list[int]:
        if self.level == "characters":
            return [int(i) for i in encode(text)]
        vocabulary = {word: i for i, word in enumerate(self.tokens)}
        return [vocabulary.get(word, words.OOV) for word in words.words_of(text)]

    def join(self, tokens: list[str]) -> str:
        return "".join(tokens) if self.level == "characters" else " ".join(tokens)


@dataclass(slots=True)
class Sample:
    prompt: str
    tokens: list[str]                # what the model wrote after the prompt, one character or word each
    text: str                        # the prompt and the tokens as text


def load_language_model(run_dir: str | Path) -> LanguageModel:
    """The model of a federated run directory trained on one of the text sets, with its final weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.toml: not a run directory")
    raw = load_toml(run_dir / "config.toml")
    if "fl" not in raw:
        raise ValueError(f"{run_dir} is not a federated run: plait generate samples from a federated run trained on "
                         f"data.name = {' or '.join(map(repr, TEXT_SETS))}")
    raw.pop("net", None)  # a network run: its model, data and fl tables are the simulator's
    config = from_dict(FederatedRunConfig, raw)
    data = config.data
    if data.source or data.name not in TEXT_SETS:
        trained_on = f"data.source = {data.source!r}" if data.source else f"data.name = {data.name!r}"
        raise ValueError(f"{run_dir}: its model ({config.model.label}) is not a language model, it was trained on "
                         f"{trained_on}; plait generate samples from runs trained on data.name = "
                         f"{' or '.join(map(repr, TEXT_SETS))} (model char_lstm or word_lstm)")
    never: tuple[int, ...] = ()
    if data.name == "shakespeare":
        tokens, window = list(VOCAB), SEQ_LEN
    else:
        arrays = words.load_shakespeare_words(data.path or None, Path(data.cache_dir) if data.cache_dir else None)
        tokens, window, never = arrays["vocab"].tolist(), words.WINDOW, (words.PAD, words.OOV)
    model = build_model(config.model, len(tokens))
    _load_weights(model, run_dir, config)
    return LanguageModel(model.eval(), TEXT_SETS[data.name], tokens, window, never)


def _load_weights(model: torch.nn.Module, run_dir: Path, config: FederatedRunConfig) -> None:
    if (run_dir / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
        return
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has neither {WEIGHTS_FILE} nor {CHECKPOINT_FILE}: the run has not "
                                "finished a round")
    params = load_checkpoint(run_dir / CHECKPOINT_FILE)["params"]
    if params.dim() == 2:  # server-less gossip: one model per node; the average model is the run's
        params = params.mean(0)
    initial, spec = flat_model_state(model, buffers=config.fl.buffers == "federated")
    if params.numel() != initial.numel():
        raise ValueError(f"{run_dir}/{CHECKPOINT_FILE} holds {params.numel()} values, the config's model "
                         f"{config.model.label} has {initial.numel()}")
    model.load_state_dict(state_dict_of(model, spec, params))


@torch.inference_mode()
def generate(lm: LanguageModel, prompt: str = DEFAULT_PROMPT, length: int = 100, temperature: float = 0.8,
             seed: int = 0) -> Sample:
    """`length` tokens after `prompt`, each drawn from the model's softmax at `temperature` (0: the arg-max)."""
    if length < 0:
        raise ValueError(f"--length must be >= 0, got {length}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    ids = lm.encode(prompt)
    if not ids:
        raise ValueError(f"--prompt {prompt!r} holds no {lm.level[:-1]} the model can read")
    padding = [words.PAD] * lm.window if lm.level == "words" else []  # as the word model saw a role's start
    generator = torch.Generator().manual_seed(seed)
    written: list[int] = []
    for _ in range(length):
        context = (padding + ids)[-lm.window :]
        logits = lm.model(torch.tensor([context], dtype=torch.int64))[0].float()
        logits[list(lm.never)] = float("-inf")
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=0), 1, generator=generator))
        ids.append(token)
        written.append(token)
    tokens = [lm.tokens[i] for i in written]
    text = lm.join([prompt, *tokens]) if tokens else prompt
    return Sample(prompt, tokens, text)
