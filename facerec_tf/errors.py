"""Typed errors shared by the whole package.

Every error about bad input names *where* the problem is (file, byte offset, record key or
config key) and *what was expected*, so a user can find the broken byte without a debugger.
"""

from __future__ import annotations

import os


class FacerecError(Exception):
    """Base class of every error raised on purpose by facerec_tf."""


class DataFormatError(FacerecError, ValueError):
    """A file does not have the format we expected.

    Attributes:
        path: the file (or shard) that is malformed, or ``None``.
        offset: the byte offset inside ``path`` where the problem starts, or ``None``.
        key: the record key / index / feature key concerned, or ``None``.
        expected: a short description of what was expected, or ``None``.
        detail: the bare message without the location prefix.
    """

    def __init__(self, detail: str, *, path=None, offset=None, key=None, expected=None):
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.key = key
        self.expected = expected
        self.detail = detail
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if key is not None:
            where.append(f"key {key}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        msg = ": ".join([", ".join(where), detail]) if where else detail
        if expected is not None:
            msg += f" (expected {expected})"
        super().__init__(msg)


class RecordIOError(DataFormatError):
    """A malformed MXNet RecordIO ``.rec`` / ``.idx`` / ``property`` file."""


class TFRecordError(DataFormatError):
    """A malformed TFRecord shard or a shard that disagrees with its manifest."""


class ImageError(DataFormatError):
    """An image payload that is not a usable face crop (bad JPEG header, wrong size...)."""


class VerificationBinError(DataFormatError):
    """A malformed or unsafe insightface verification ``.bin`` pairs file."""


class MissingDependencyError(FacerecError, ImportError):
    """An optional dependency (an ``extra`` of the package) is not installed."""


class ConfigError(FacerecError, ValueError):
    """A configuration key is unknown or has a value of the wrong type."""

    def __init__(self, detail: str, *, key=None):
        self.key = key
        self.detail = detail
        super().__init__(f"config key {key!r}: {detail}" if key is not None else detail)
