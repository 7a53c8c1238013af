"""The one exception type for user mistakes.

A `UserError` is something the user can fix (a wrong file, a wrong shape, a missing backend). The CLI
prints its message as one paragraph and exits non-zero, without a traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} {self.hint}"
        return self.message
