"""Checks of option values that every command makes before any work (no torch import)."""
from __future__ import annotations

from .devices import check_device_name
from .errors import OptionError


def check_option_values(device: str | None = None, choices: dict | None = None, **at_least) -> None:
    """``device`` a known device name; each ``name=(value, minimum)`` (value None = unset)
    at least its minimum; each ``choices[name] = (value, allowed)`` one of the allowed
    values. Messages name the CLI option (``batch_size`` → ``--batch-size``)."""
    if device is not None:
        check_device_name(device)
    for name, (value, minimum) in at_least.items():
        if value is not None and value < minimum:
            raise OptionError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    for name, (value, allowed) in (choices or {}).items():
        if value is not None and value not in allowed:
            raise OptionError(f"unknown --{name.replace('_', '-')} {value!r}; choose {' or '.join(allowed)}")
