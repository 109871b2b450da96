"""The one exception type for bad user input.

Every error a user can cause (a bad path, a misspelt key, a file of the wrong kind) is
raised as :class:`RFIError` with a one-line message; the ``rfi`` command line prints that
line and exits with code 2 (a traceback only with ``--debug``).
"""


class RFIError(Exception):
    """A user-facing error: the message is one line that names the file, key or value."""
