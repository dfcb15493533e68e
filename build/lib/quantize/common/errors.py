"""The one exception type for failures the user can fix (bad recipe, missing file, offline hub id).

The CLI prints these as a short message and exits 2; anything else is a bug and keeps its traceback.
"""


class QuantizeError(Exception):
    """A user-facing failure: the message names the bad value, where it came from and what is accepted."""
