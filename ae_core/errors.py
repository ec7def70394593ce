"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class AeError(Exception):
    """A user-facing error: a wrong argument, an unreachable store, a missing output.

    The message names the object at fault and the likely fix. `transient`: the same run may
    succeed later (an unreachable store), so the flow's retries apply; the others are verdicts
    the same inputs would only repeat, and are not retried.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class DecodeError(Exception):
    """One object could not be turned into pixels; it becomes a row in the rejects table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
