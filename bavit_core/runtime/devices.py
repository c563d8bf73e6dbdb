"""Devices: checking ``--device`` and turning it into a torch device."""
from __future__ import annotations

import re

from .errors import OptionError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_device_name(name: str) -> None:
    """Refuse a ``--device`` that is not auto, cpu, cuda, cuda:N or mps (no torch import, so
    commands can check it before any work)."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise OptionError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")


def check_device_available(name: str) -> None:
    """Refuse, before any work, a ``--device`` this machine lacks (cuda without CUDA, an
    absent cuda:N, mps off Apple GPUs). Imports torch only for such a device."""
    check_device_name(name)
    if name not in ("auto", "cpu"):
        resolve_device(name)


def resolve_device(name: str = "auto"):
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name} asked for, but CUDA is not available")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("--device mps asked for, but MPS is not available")
    return torch.device(name)
