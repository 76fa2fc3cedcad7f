"""The errors of bad input, which the command line reports as one line ("error: ...", exit code 2) without a
traceback. Plain Python (no torch) so that the command line can catch them before any pipeline is imported;
``utils``, ``datasets`` and ``backbones`` re-export them where they are raised."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the path/name and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class BackboneError(ValueError):
    """A backbone that cannot be built (unknown name, bad layer, missing weights)."""


ONE_LINE_ERRORS = (UserError, DatasetError, BackboneError)
