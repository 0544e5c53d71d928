"""`plait generate RUN_DIR`: text from a trained character or word model (the sampling is in
plait/federated/generate.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from plait.settings.config import ConfigError

errors = Console(stderr=True, soft_wrap=True)


def generate(run_dir: Path = typer.Argument(..., help="a run trained on shakespeare or shakespeare_words"),
             prompt: str | None = typer.Option(None, "--prompt",
                                               help="the text to continue [default: 'To be, or not to be']"),
             length: int = typer.Option(100, "--length", help="characters or words to write after the prompt"),
             temperature: float = typer.Option(0.8, "--temperature", help="softmax temperature; 0: greedy"),
             seed: int = typer.Option(0, "--seed", help="the sampling's random seed")) -> None:
    """Sample text from RUN_DIR's trained character or word model: the prompt, then what the model writes."""
    from plait.federated.generate import generate as sample
    from plait.federated.generate import load_language_model

    try:
        model = load_language_model(run_dir)
        given = {"prompt": prompt} if prompt is not None else {}  # else the sampler's default
        text = sample(model, length=length, temperature=temperature, seed=seed, **given).text
    except (ConfigError, FileNotFoundError, ValueError) as err:
        errors.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from err
    print(text)  # plain print: rich would read [brackets] in the text as markup
