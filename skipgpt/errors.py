"""One exception type for every user-facing failure.

The CLI catches :class:`SkipGPTError` and prints its message without a traceback, so each
message must say what went wrong *and* what to do about it.
"""


class SkipGPTError(Exception):
    """A problem with the user's input or environment, explained in the message."""
