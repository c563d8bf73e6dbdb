"""Devices: turning ``--device`` into a torch device."""
from __future__ import annotations

import torch

from .errors import OptionError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda asked for, but CUDA is not available")
    return torch.device(name)
