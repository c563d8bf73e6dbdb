"""Exceptions raised by bavit_core for bad input.

The CLI turns every :class:`BavitError` into a one-line ``Error: ...`` message
with exit code 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class BavitError(Exception):
    """Base class for errors caused by user input (files, options, data)."""


class InputFileError(BavitError):
    """A file or directory is missing, unreadable or malformed."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OptionError(BavitError):
    """An option value is out of range or inconsistent with another."""


class TrainingDiverged(BavitError):
    """The loss became NaN or infinite."""
