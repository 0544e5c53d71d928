"""`plait generate RUN_DIR`: text from a trained character or word model (the sampling is in
plait/federated/generate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from plait.cli.output import fail
from plait.cli.parsing import Commands, add_command
from plait.settings.config import ConfigError


def generate(args: argparse.Namespace) -> None:
    """Sample text from RUN_DIR's trained character or word model: the prompt, then what the model writes."""
    from plait.federated.generate import generate as sample
    from plait.federated.generate import load_language_model

    try:
        model = load_language_model(args.run_dir)
        given = {"prompt": args.prompt} if args.prompt is not None else {}  # else the sampler's default
        text = sample(model, length=args.length, temperature=args.temperature, seed=args.seed, **given).text
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    print(text)  # plain print: rich would read [brackets] in the text as markup


def add_to(commands: Commands) -> None:
    command = add_command(commands, "generate", generate)
    command.add_argument("run_dir", type=Path, help="a run trained on shakespeare or shakespeare_words")
    command.add_argument("--prompt", default=None, help="the text to continue [default: 'To be, or not to be']")
    command.add_argument("--length", type=int, default=100, help="characters or words to write after the prompt")
    command.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy")
    command.add_argument("--seed", type=int, default=0, help="the sampling's random seed")
