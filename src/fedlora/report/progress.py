"""One rich progress bar for long loops (rounds of a run, runs of a grid)."""

from __future__ import annotations

from typing import Any


def progress_bar(unit: str = "") -> Any:
    """A rich ``Progress`` with description, bar, count, a free ``status`` field and times."""
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    count = "{task.completed}/{task.total}" + (f" {unit}" if unit else "")
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(count),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn())
