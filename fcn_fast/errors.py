"""The error type for user mistakes (a missing file, a bad value, a wrong checkpoint): the CLI prints its message
as one line and exits non-zero, with no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; the message names the file or value at fault."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises an exception with "Caught ... Original Traceback ..." as its message; the
        # user needs only the original one line, which is the traceback's last line.
        text = str(message)
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = text.strip().splitlines()[-1]
            text = last.split(": ", 1)[1] if last.startswith(f"{__name__}.UserError: ") else last
        super().__init__(text)
