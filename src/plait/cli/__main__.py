"""`python -m plait.cli ...`: the `plait` command, as torchrun starts it on each rank."""

from plait.cli import app

app()
