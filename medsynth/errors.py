"""User-facing errors.

Anything the user can fix (a bad config key, an unreadable file, a wrong shape) is raised as
:class:`MedsynthError` with one line that names the file or key and what was expected. The CLI turns
it into ``error: <message>`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import re

# Terminal escape sequences (colours, cursor moves) and other control characters: a library's message
# (torch colours its advice) or a file name taken from input data must not drive the user's terminal.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


class MedsynthError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line: it is printed as-is by the CLI.
        super().__init__(" ".join(_ESCAPES.sub(" ", str(message)).split()))
