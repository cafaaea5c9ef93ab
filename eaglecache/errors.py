"""The one exception type that the command line turns into a clean error line.

Raise ``UserError`` for anything the user can fix (a bad path, a bad config, an
input file in the wrong format). The CLI prints ``error: <message>`` and exits
with code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or environment, reported in one line."""

    exit_code = 2
