"""Errors raised for bad user input: each names the file and the problem."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data: an unreadable file, a wrong shape or dtype, a missing label.

    Attributes:
        path: the offending file or folder, when there is one.
        problem: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class BundleError(DataError):
    """A model bundle that is missing a file, corrupt, or of an unknown format."""
