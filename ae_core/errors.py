"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class AeError(Exception):
    """A user-facing error: a wrong argument, an unreachable store, a missing output.

    The message names the object at fault and the likely fix.
    """


class DecodeError(Exception):
    """One object could not be turned into pixels; it becomes a row in the rejects table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
