"""Where rich tables go: the terminal's own width, or a fixed width when piped."""

from __future__ import annotations

from rich.console import Console

# Wide enough for every table aprtrace prints, narrow enough for logs and `less`.
PIPED_WIDTH = 120


def stdout_console() -> Console:
    """A Console for stdout that fits a terminal, or uses PIPED_WIDTH when not a terminal."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console
