"""Errors a user can act on.

Anything raised as a :class:`StepbackError` is printed by the CLI as one line (no traceback): it describes bad
input or configuration, names the file, the record and the field where it can, and says what to do. Anything
else is a bug in stepback-ray and keeps its traceback.
"""

from __future__ import annotations


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
