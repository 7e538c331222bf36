"""The error every data problem a user can fix is reported with."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data set's files cannot be used as they are; the message names the file or folder
    and what is wrong. ``wcl`` prints it as one line and exits with status 2."""
