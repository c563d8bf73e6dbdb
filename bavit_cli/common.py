"""Shared CLI plumbing: error mapping, progress bars, summary tables."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bavit_core.runtime.errors import BavitError

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (temp files removed)."""


_resume_hints: list[tuple[str, Callable[[], bool] | None]] = []


@contextlib.contextmanager
def resume_hint(command: str, available: Callable[[], bool] | None = None) -> Iterator[None]:
    """While the block runs, an interrupt tells the user ``command`` resumes the work
    (when ``available()`` says there is something to resume)."""
    _resume_hints.append((command, available))
    try:
        yield
    except KeyboardInterrupt:
        raise  # cli_command reads the hint, then clears it
    except BaseException:
        _resume_hints.pop()
        raise
    else:
        _resume_hints.pop()


def quiet_libraries() -> None:
    """Silence library noise (Python warnings, transformers/torch/numpy chatter) so an
    error is one ``Error:`` line and a result is our own output only."""
    warnings.simplefilter("ignore")
    for k, v in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                 ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TF_CPP_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(k, v)
    if "transformers" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["transformers"].utils.logging.set_verbosity_error()
    logging.getLogger("timm").setLevel(logging.ERROR)


def _on_sigterm(signum, frame):
    raise Terminated()


def cli_command(fn: Callable) -> Callable:
    """Turn BavitError into a one-line ``Error: ...`` with exit code 1, no traceback.

    Ctrl-C (exit 130) and SIGTERM (exit 143) unwind the same way: atomic writes remove their
    temporary files, and the user is told how to resume when the command can."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                quiet_libraries()
                return fn(*args, **kwargs)
        except BavitError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            what = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
            hint = ""
            if _resume_hints:
                command, available = _resume_hints[-1]
                if available is None or available():
                    hint = f" Resume with: {command}"
            err_console.print(f"{what}; no output was left half-written.{hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=143 if isinstance(exc, Terminated) else 130)
        finally:
            _resume_hints.clear()
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    return wrapper


def early_option_checks(device: str | None = None, choices: dict | None = None, **at_least) -> None:
    """Option checks a command makes before any work: ``device`` a known name, each
    ``name=(value, minimum)`` (value None = unset) at least its minimum, each
    ``choices[name] = (value, allowed)`` one of the allowed values."""
    from bavit_core.runtime.devices import check_device_name
    from bavit_core.runtime.errors import OptionError

    if device is not None:
        check_device_name(device)
    for name, (value, minimum) in at_least.items():
        if value is not None and value < minimum:
            raise OptionError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    for name, (value, allowed) in (choices or {}).items():
        if value is not None and value not in allowed:
            raise OptionError(f"unknown --{name.replace('_', '-')} {value!r}; choose {' or '.join(allowed)}")


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

