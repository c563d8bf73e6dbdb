"""Shared CLI plumbing: error mapping, progress bars, summary tables."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bavit_core.runtime.launch import is_main_process
from bavit_core.runtime.errors import BavitError

def _log_width(stream) -> int | None:
    """Off a terminal (a pipe, `| tee log`, CI) rich would cut tables and wrap lines at 80
    columns; logs get 200 unless COLUMNS says otherwise. A terminal keeps its own width."""
    if os.environ.get("COLUMNS"):
        return None
    try:
        return None if stream.isatty() else 200
    except (AttributeError, ValueError):
        return 200


console = Console(width=_log_width(sys.stdout))
err_console = Console(stderr=True, width=_log_width(sys.stderr))


def fail(message: str) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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


@contextlib.contextmanager
def resumable_run(command: str, out, main: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A training run into ``out``: an interrupt says ``bavit COMMAND --out OUT --resume``
    once an epoch is committed (state.pt exists); yields the ``on_resume(epoch, epochs)``
    callback that tells, on rank 0, from which epoch a resumed run continues."""
    def on_resume(epoch: int, epochs: int) -> None:
        if main:
            err_console.print(f"Resuming {out} from epoch {epoch} of {epochs}.", highlight=False, soft_wrap=True)

    with resume_hint(f"bavit {command} --out {out} --resume", lambda: (out / "state.pt").is_file()):
        yield on_resume


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
            if not is_main_process():  # under torchrun every rank raises the same error: print it once
                raise typer.Exit(code=1)
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


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StageProgress:
    """Progress of a command in numbered stages. Call it as ``progress(advance, total)``
    (the library's callback); ``stage(name)`` starts the next stage, ``substage(name)``
    restarts the count inside the current one (e.g. demo's prune-eval). On a terminal a
    rich bar is drawn; off a terminal one plain line goes to stderr per stage and at least
    every ``interval`` seconds while a stage runs::

        stage 3/5 detecting: 640/1360 images, 1:12 elapsed
    """

    def __init__(self, description: str, stages: int | None, unit: str, prog: Progress | None, interval: float,
                 total: int | None = None, epochs: int | None = None):
        self.description, self.n_stages, self.unit, self.interval = description, stages, unit, interval
        self.epochs = epochs  # the library reports per-epoch totals: show the whole run's and the epoch
        self.prog, self.task = prog, None
        self.index, self.name, self.sub = 0, description, None
        self.done, self.total = 0, None
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        if stages is None:  # a one-stage command: it starts now
            self._start(description)
            self.total = total
            if prog is not None:
                prog.update(self.task, total=total)
        if prog is None:
            self.thread = threading.Thread(target=self._heartbeat, daemon=True)
            self.thread.start()

    # -- the library-facing callback
    def __call__(self, advance: int, total: int | None = None) -> None:
        with self.lock:
            if self.index == 0:
                self._start(self.description)
            if total is not None:
                self.per_epoch = total
                self.total = total * self.epochs if self.epochs else total
            self.done += advance
            if self.prog is not None:
                self.prog.update(self.task, total=self.total, completed=self.done, description=self._label())

    def stage(self, name: str, unit: str | None = None) -> None:
        with self.lock:
            if self.index and self.prog is None:
                self._line()  # close the previous stage with its final count
            self._start(name, unit)

    def substage(self, name: str) -> None:
        with self.lock:
            self.sub, self.done, self.total = name, 0, None
            self._describe()

    def _start(self, name: str, unit: str | None = None) -> None:
        self.index += 1
        self.name, self.sub, self.done, self.total = name, None, 0, None
        if unit is not None:
            self.unit = unit
        self._describe()
        self.last_line = time.monotonic()  # off a terminal a stage's line comes when it ends (or every interval)

    def _label(self) -> str:
        of = f"/{max(self.n_stages or 1, self.index)}"
        sub = f" ({self.sub})" if self.sub else ""
        if self.epochs and getattr(self, "per_epoch", None):
            sub += f" epoch {min(self.done // self.per_epoch + 1, self.epochs)}/{self.epochs}"
        return f"stage {self.index}{of} {self.name}{sub}"

    def _describe(self) -> None:
        if self.prog is None:
            return
        if self.task is None:
            self.task = self.prog.add_task(self._label(), total=None)
        else:
            self.prog.reset(self.task, total=None, description=self._label())

    def line(self) -> str:
        elapsed = f"{_clock(time.monotonic() - self.t0)} elapsed"
        if not self.done and self.total is None:  # a stage that counts nothing (loading)
            return f"{self._label()}, {elapsed}"
        count = f"{self.done}/{self.total if self.total is not None else '?'}"
        return f"{self._label()}: {count} {self.unit}, {elapsed}"

    def _line(self) -> None:
        err_console.print(self.line(), highlight=False, markup=False, soft_wrap=True)
        self.last_line = time.monotonic()

    def _heartbeat(self) -> None:
        while not self.stop.wait(min(self.interval, 1.0)):
            with self.lock:
                if self.index and time.monotonic() - self.last_line >= self.interval:
                    self._line()

    def close(self, completed: bool = True) -> None:
        """Stop; off a terminal, the last stage's line (not after an error: the error line
        stands alone)."""
        self.stop.set()
        with self.lock:
            if completed and self.prog is None and self.index:
                self._line()


class _SilentProgress:
    """StageProgress's interface, showing nothing (the other ranks under torchrun)."""

    def __call__(self, advance: int, total: int | None = None) -> None:
        pass

    def stage(self, name: str, unit: str | None = None) -> None:
        pass

    def substage(self, name: str) -> None:
        pass

    def close(self, completed: bool = True) -> None:
        pass


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, stages: int | None = None, unit: str = "images",
                 interval: float = 30.0, epochs: int | None = None) -> Iterator[StageProgress]:
    """Yield a :class:`StageProgress`: a rich bar on a terminal, plain numbered lines on
    stderr otherwise (``stages``: how many the command has, None for a one-stage command;
    ``epochs``: the library reports steps per epoch and the run has this many)."""
    if not is_main_process():  # under torchrun only rank 0 shows progress
        yield _SilentProgress()
        return
    with contextlib.ExitStack() as stack:
        prog = None
        if err_console.is_terminal:
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn()]
            prog = stack.enter_context(Progress(*columns, console=err_console, transient=True))
        p = StageProgress(description, stages, unit, prog, interval, total, epochs)
        ok = False
        try:
            yield p
            ok = True
        finally:
            p.close(ok)


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def print_table(table: Table) -> None:
    console.print(table)



def renamed(old: str, new: str, old_value, new_value, default):
    """An option's old spelling (hidden in --help): it works for one release and says so in
    one line on stderr; given together with the new spelling it is an error."""
    if old_value is None or old_value == []:
        return new_value
    if new_value != default:
        raise BavitError(f"{old} is the old name of {new}: give one of them")
    err_console.print(f"Note: {old} is deprecated and will be removed in the next release; use {new}.",
                      highlight=False, markup=False, soft_wrap=True)
    return old_value
