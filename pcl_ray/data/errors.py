"""The errors the data layer raises: one line each, naming the config key or the file at fault.

All are :class:`~pcl_ray.config.ConfigError` (the CLI prints ``error: ...`` and exits 2), so a bad
data set stops a run the same way a bad config key does.
"""

from __future__ import annotations

from ..config import ConfigError

__all__ = ["DataError", "DataNotFoundError", "BadImageError", "reason"]


class DataError(ConfigError):
    """The data set named by the ``data`` section cannot be used as it is."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file or folder the ``data`` section points to is missing (also a ``FileNotFoundError``)."""


class BadImageError(DataError):
    """An image that does not decode. The message names the file (and the row, for Parquet).

    Takes the message as its only argument, so that it pickles (Ray workers) and survives a
    ``DataLoader`` worker, which rebuilds it from a text that holds the whole traceback: only the
    original one-line message is kept then.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:  # rebuilt by torch's DataLoader
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def reason(exc: BaseException) -> str:
    """A one-line description of ``exc`` for an error message."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__
