"""Small file helpers: atomic writes (files and whole directories), content hashes,
and the checks every command makes on its output paths.

Temporary files and directories are siblings of their destination named
``.<name>.<pid>.<random>.tmp`` (``.tmpdir`` for directories): the pid lets the next run
remove what a SIGKILLed process left behind without touching a live writer's files.
Outputs get the usual ``0666 & ~umask`` / ``0777 & ~umask`` modes (mkstemp's 0600 would
hide reports from colleagues and web servers).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

try:  # optional speed-up: orjson parses COCO-scale files ~3x faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

from .errors import InputFileError, OptionError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|tmpdir|old)$")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EROFS,):
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory, expected a file path"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of a directory"
    if exc.errno == getattr(errno, "EDQUOT", -1):
        return "disk quota exceeded"
    return exc.strerror or type(exc).__name__


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale_temps(parent: Path, name: str | None = None) -> int:
    """Remove temporary siblings left in ``parent`` by processes that no longer run
    (a SIGKILL gives no chance to clean up). Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for e in entries:
        m = _TMP_RE.match(e.name)
        if not m or (name is not None and m.group("name") != name) or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
            removed += 1
    return removed


def _make_parent(dest: Path) -> Path:
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(parent, f"cannot create output directory ({_os_problem(exc)})") from None
    if not parent.is_dir():
        raise InputFileError(parent, "cannot create output directory (a file is in the way)")
    return parent


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success.

    An exception (or an interrupt) inside the block removes the temporary file, so
    ``dest`` is either the complete new file or whatever was there before. Write errors
    (disk full, read-only file system, permissions) become :class:`InputFileError`.
    """
    dest = Path(dest)
    parent = _make_parent(dest)
    if dest.is_dir():
        raise InputFileError(dest, "is a directory, expected a file path")
    clean_stale_temps(parent, dest.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputFileError(dest, f"cannot write ({_os_problem(exc)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno is not None:
            raise InputFileError(dest, f"cannot write ({_os_problem(exc)})") from None
        raise


def check_replaceable_dir(dest: Path, markers: Iterable[str] = ()) -> None:
    """Refuse to replace a directory that is not one of our outputs: a non-empty ``dest``
    must hold one of ``markers`` (e.g. ``results.csv``), and never be the working
    directory, one of its parents, or the home directory."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise InputFileError(dest, "is a file, expected a directory path")
    r = dest.resolve()
    cwd = Path.cwd().resolve()
    if r == cwd or r in cwd.parents or r == Path.home().resolve():
        raise OptionError(f"--out {dest} is the working or home directory (or holds it); name a new directory")
    markers = tuple(markers)
    if markers and any(dest.iterdir()) and not any((dest / m).exists() for m in markers):
        raise InputFileError(dest, f"holds other files (no {' or '.join(markers)}): refusing to replace it; "
                             "name a new or empty directory")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, replace: bool = True, markers: Iterable[str] = ()) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it onto ``dest`` whole.

    On success an existing ``dest`` is replaced (``replace=True``) as a unit, so readers see
    either the old directory or the complete new one, never a mix of two runs. On any
    exception the temporary directory is removed and ``dest`` is untouched. An existing
    non-empty ``dest`` is only replaced when it holds one of ``markers`` (see
    :func:`check_replaceable_dir`).
    """
    dest = Path(dest)
    parent = _make_parent(dest)
    if dest.exists() and not dest.is_dir():
        raise InputFileError(dest, "is a file, expected a directory path")
    if dest.exists() and not replace:
        raise InputFileError(dest, "already exists")
    check_replaceable_dir(dest, markers)
    clean_stale_temps(parent, dest.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmpdir", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as exc:
        raise InputFileError(dest, f"cannot write ({_os_problem(exc)})") from None
    try:
        yield tmp
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno is not None:
            raise InputFileError(dest, f"cannot write ({_os_problem(exc)})") from None
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def refuse_output_over_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                              option: str = "--out", is_dir: bool = False) -> None:
    """Refuse an output path that would overwrite (or, for a directory output, contain)
    one of the command's inputs: ``label --ann a.json --out a.json`` must not replace the
    annotations."""
    o = Path(out).expanduser().resolve()
    for i in inputs:
        if i is None or str(i) == "":
            continue
        p = Path(i).expanduser().resolve()
        if o == p or (is_dir and o in p.parents):
            raise OptionError(f"{option} {out} would overwrite the input {i}; choose another output path")


def resolve_input_paths(opts, fields: Iterable[str], hub_or_path: Iterable[str] = ()) -> None:
    """Store ``opts``'s path ``fields`` absolute (a resumed run must find its inputs from any
    directory); ``hub_or_path`` fields may hold a hub name and are resolved only when they
    name something here."""
    for k in fields:
        v = getattr(opts, k)
        if v:
            setattr(opts, k, str(Path(v).expanduser().resolve()))
    for k in hub_or_path:
        v = getattr(opts, k)
        if v and Path(v).expanduser().exists():
            setattr(opts, k, str(Path(v).expanduser().resolve()))


def _write_problem(d: Path) -> str | None:
    """Why nothing can be created in the existing directory ``d`` (None: it can). Asks the
    kernel (``access``), which knows read-only mounts and, for root, ignores mode bits."""
    kw = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if os.access(d, os.W_OK | os.X_OK, **kw):
        return None
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def check_output_writable(out: str | os.PathLike, in_place: bool = False) -> None:
    """Refuse, before any work, an output path nothing can be written to: the directory it
    is created in (its nearest existing parent) must accept new files, and so must ``out``
    itself when the command writes inside an existing directory (``in_place``: a run
    directory, which is filled file by file). Writes nothing. A file in the way is left to
    the writers, which name it."""
    p = Path(out).expanduser()
    if in_place and p.is_dir():
        problem = _write_problem(p)
        if problem:
            raise InputFileError(p, f"cannot write the output here ({problem})")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return
    problem = _write_problem(parent)
    if problem:
        where = "" if parent == p.parent else f" in {parent}"
        raise InputFileError(p, f"cannot write the output here ({problem}{where})")


def check_new_run_dir(out: Path, overwrite: bool) -> None:
    """A fresh run's directory: a path that is no file, empty unless ``overwrite``, and
    writable (checked before training, not at its first save)."""
    if out.exists() and not out.is_dir():
        raise InputFileError(out, "is a file, expected a run directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OptionError(f"{out} already holds files (a previous run?); pass --resume to continue it "
                          "or --overwrite to replace it")
    check_output_writable(out, in_place=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileError(p, f"{what} not found")
    if not p.is_file():
        raise InputFileError(p, f"expected a {what}, found a directory")
    if not os.access(p, os.R_OK):
        raise InputFileError(p, f"{what} not readable (permission denied)")
    return p


def require_dir(path: str | os.PathLike, what: str = "directory") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileError(p, f"{what} not found")
    if not p.is_dir():
        raise InputFileError(p, f"expected a {what}, found a file")
    return p


def read_training_state(path: str | os.PathLike, keys: tuple[str, ...]) -> dict:
    """A run's ``state.pt`` (plain tensors and containers only: ``weights_only``), holding
    every one of ``keys``; anything else is one clean error saying to start again."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or a pickle that is not plain weights
        raise InputFileError(path, f"unreadable training state ({type(exc).__name__}); "
                             "resume is impossible, start again with --overwrite") from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise InputFileError(path, "training state without epoch/optimizer/model (written by an older bavit?); "
                             "start again with --overwrite")
    return state


def parse_json_file(path: str | os.PathLike):
    """Parse a JSON file; a syntax error names the file, line and column (OSError is the
    caller's to word)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise InputFileError(path, "malformed JSON (nested too deeply)") from None
    except ValueError as exc:
        pos = getattr(exc, "pos", None)
        if pos is None:
            raise InputFileError(path, f"malformed JSON ({exc})") from None
        line = data.count(b"\n", 0, pos) + 1
        col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        msg = getattr(exc, "msg", str(exc)).split(":")[0]
        raise InputFileError(path, f"malformed JSON at line {line}, column {col}: {msg}") from None
