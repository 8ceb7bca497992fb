"""The one exception the CLI turns into a clean one-line message and exit code 2.

Library code raises UserError for anything the user can fix (a bad recipe key, a missing file, a
package to install). The message names the file, key or value and says how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a fix in its message."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x09), *range(0x0B, 0x20), 0x7F]}


def printable(text: str) -> str:
    """`text` safe to show on a terminal: control bytes (escape sequences, bells, backspaces from a
    binary file or a stray keypress) are written as \\xNN instead of acting on the terminal."""
    return str(text).translate(_CONTROL)
