"""Errors a user can act on.

Anything raised as a :class:`StepbackError` is printed by the CLI as one line (no traceback): it describes bad
input or configuration, names the file, the record and the field where it can, and says what to do. Anything
else is a bug in stepback-ray and keeps its traceback.
"""

from __future__ import annotations

import errno
from typing import BinaryIO


class StepbackError(Exception):
    """A problem with the user's input or configuration, reported as one line."""


class ConfigError(StepbackError):
    """The job spec is invalid (unknown key, bad value, missing field)."""


class InputError(StepbackError):
    """An input file is missing, unreadable or not in the expected shape."""

    def __init__(self, source: str, message: str, *, record: str | None = None, field: str | None = None):
        where = source
        if record is not None:
            where += f": record {record}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.record = record
        self.field = field


class StorageError(StepbackError):
    """Object storage is unreachable, the bucket is missing, or access is denied."""


class StorageFull(StorageError):
    """The disk (or quota) under an output is full. Not bad input: it exits 3; what was committed before stays
    readable, nothing half-written is left, and rerunning once there is space resumes."""

    exit_code = 3

    @classmethod
    def of(cls, uri: str, exc: BaseException) -> StorageError | None:
        """The error to raise for ``exc`` met writing ``uri`` when it says the disk is full (None: it does not)."""
        if isinstance(exc, StorageFull):
            return exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return cls(
                f"{uri}: no space left on the device; what was committed before is kept: free some space and "
                "run the command again (a run resumes with the same run_id)"
            )
        return None

    @classmethod
    def within(cls, uri: str, exc: BaseException) -> StorageError | None:
        """As :meth:`of` for an error that carries the disk-full one inside it: raised in a Ray worker, it reaches
        the driver wrapped, with the worker's error in its cause chain (``cause`` for Ray's task errors) or only in
        its text."""
        seen: set[int] = set()
        stack: list[BaseException | None] = [exc]
        while stack:
            e = stack.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            found = cls.of(uri, e)
            if found is not None:
                return found
            stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        text = str(exc)
        if any(m in text for m in ("No space left on device", "[Errno 28]", "Disk quota exceeded", "[Errno 122]")):
            return cls.of(uri, OSError(errno.ENOSPC, "No space left on device"))
        return None

    @classmethod
    def naming(cls, file: BinaryIO, uri: str) -> BinaryIO:
        """``file`` (being written to ``uri``) whose writes name it when the disk is full."""

        class Named:
            def write(self, data: bytes) -> int:
                try:
                    return file.write(data)
                except OSError as e:
                    raise cls.of(uri, e) or e from None

            def __getattr__(self, name: str):
                return getattr(file, name)

        return Named()  # type: ignore[return-value]


class DamagedFile(StepbackError):
    """A file a run or the profile store wrote is not what was written: truncated, unreadable, not the expected
    shape, or its bytes differ from the checksum recorded when it was committed."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: {problem}")
        self.uri, self.problem = uri, problem

    def __reduce__(self):  # raised in Ray workers: rebuilt from its two fields
        return (type(self), (self.uri, self.problem))


class NotAProfileStore(StepbackError):
    """A URI given as a profile store holds none (no ``CURRENT.json``, no ``versions/``), or the store has no
    current version to read yet."""


class UnknownColumn(StepbackError):
    """A column asked of the profile store that its profile rows do not have."""


class ClusterError(StepbackError):
    """The Ray cluster at the configured address is unreachable or refuses the connection."""


class RunFailed(StepbackError):
    """The run could not do its work (engine errors over ``max_error_fraction``, an engine that kept dying). Not
    bad input: it exits 3, its manifest says ``status: failed``, and rerunning the same run id retries what failed."""

    exit_code = 3


class ErrorBudgetExceeded(RunFailed):
    """A pass's engine-error rows exceed ``max_error_fraction`` of its rows."""

    def __init__(self, what: str, errors: int, total: int, fraction: float, counts: dict | None = None):
        super().__init__(
            f"{errors} of {total} {what} are engine errors, over max_error_fraction = {fraction:g}; "
            "rerun the same run id to retry exactly those rows (the others are kept)"
        )
        self.what, self.errors, self.total = what, errors, total
        self.counts = counts or {}
        """What the failed run's manifest reports (rows and rows by status)."""
