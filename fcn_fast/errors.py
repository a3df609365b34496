"""The error type for user mistakes (a missing file, a bad value, a wrong checkpoint): the CLI prints its message
as one line and exits non-zero, with no traceback."""

from __future__ import annotations

import sys


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


def report(command: str, exc: BaseException) -> None:
    """Print ``exc`` as the CLI's one-line error for ``command``, once: code that must report before it can exit
    (a process of a distributed run, see fcn_fast.train) reports early, and the CLI's own handler then stays quiet."""
    if getattr(exc, "reported", False):
        return
    # One write, newline included: the processes of a distributed run share stderr, and print's two writes let
    # another's line start in the middle of this one.
    sys.stderr.write(f"fcn-fast {command}: error: {exc}\n")
    sys.stderr.flush()
    exc.reported = True
