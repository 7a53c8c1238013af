"""The one exception type for user mistakes.

A `UserError` is something the user can fix (a wrong file, a wrong shape, a missing backend). The CLI
prints its message as one paragraph and exits non-zero, without a traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it.

    `detail`: text shown verbatim after the paragraph (a log's last lines, a table), never re-flowed."""

    def __init__(self, message: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    @property
    def paragraph(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message

    def __str__(self) -> str:
        return f"{self.paragraph}\n{self.detail}" if self.detail else self.paragraph
