"""Errors a user can act on: each names the file, the row and the field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one place in a file. `row` is 1-based; 0 means the file as a whole."""

    message: str
    row: int = 0
    field: str | None = None

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row else ""
        if self.field:
            where = f"{where}: '{self.field}'" if where else f"'{self.field}'"
        return f"{where}: {self.message}" if where else self.message


class DPOSpaceError(Exception):
    """Base of every error the engine raises on purpose; its message is meant for the user."""


class DataError(DPOSpaceError):
    """A preference file that cannot be used, with every problem found (up to a cap)."""

    def __init__(self, source: str, problems: list[Problem], more: int = 0):
        self.source = source
        self.problems = problems
        self.more = more
        lines = [f"{source}: {p}" for p in problems]
        if more:
            lines.append(f"{source}: ... and {more} more problem(s)")
        super().__init__("\n".join(lines))


class TrainingError(DPOSpaceError):
    """A run that ended badly (NaN loss, out of memory, a crash) with what to do about it."""
