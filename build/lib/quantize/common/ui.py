"""Progress bars and console output, in one place (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def track(iterable, description: str, total: int | None = None):
    """Iterate with a progress bar on stderr (plain lines when stderr is not a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield from progress.track(iterable, total=total, description=description)


def step(message: str) -> None:
    console.print(f"[bold]›[/bold] {message}")
