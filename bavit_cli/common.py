"""Shared CLI plumbing: error mapping, progress bars, summary tables."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bavit_core.runtime.errors import BavitError

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def cli_command(fn: Callable) -> Callable:
    """Turn BavitError into a one-line ``Error: ...`` with exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BavitError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("Interrupted; no output was left half-written.")
            raise typer.Exit(code=130)

    return wrapper


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``progress(advance, total)`` callback drawing a rich bar on stderr."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as prog:
        task = prog.add_task(description, total=total)

        def update(advance: int, total_: int | None = None) -> None:
            if total_ is not None:
                prog.update(task, total=total_)
            prog.advance(task, advance)

        yield update


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def print_table(table: Table) -> None:
    console.print(table)

