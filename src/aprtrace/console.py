"""Where rich tables go: the terminal's own width, or a fixed width when piped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# Wide enough for every table aprtrace prints, narrow enough for logs and `less`.
PIPED_WIDTH = 120


def stdout_console() -> Console:
    """A Console for stdout that fits a terminal, or uses PIPED_WIDTH when not a terminal."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console


def stderr_progress(description: str, total: int | None) -> tuple[Progress, TaskID]:
    """A transient progress bar on stderr and its one task (callers check for a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return bar, bar.add_task(description, total=total)
