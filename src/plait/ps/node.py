"""`python -m plait.ps.node server|worker|keys ...`: the `plait ps` commands (commands.py) without the rest of the
CLI's imports, for the processes the local launcher starts. Same options, same library."""

from __future__ import annotations

from plait.ps.commands import ps_app


def main(argv: list[str] | None = None) -> None:
    """Run one command; with `argv` (from Python) its errors are raised instead of exiting."""
    if argv is None:
        ps_app(prog_name="python -m plait.ps.node")
    else:
        ps_app(args=argv, prog_name="python -m plait.ps.node", standalone_mode=False)


if __name__ == "__main__":
    main()
