"""Errors raised for invalid user input.

Every problem names the file (or field) and what is wrong, so the CLI can print one clear line per problem
instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where it is and what is wrong."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class InputError(ValueError):
    """Invalid input data; carries one or more :class:`Problem` entries."""

    def __init__(self, problems: list[Problem] | Problem | str, where: str | Path | None = None):
        if isinstance(problems, str):
            problems = [Problem(str(where) if where is not None else "input", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
