"""The console of a run: its own lines (what it runs, a progress line per pass, its result, or the one line that says
why it failed), and Ray's output kept in a file under the run's output, ``logs/ray.log``.

While a run's Ray session is open (:func:`ray_output_to_log`), the process's standard output and error (file
descriptors 1 and 2) point at that file, and the run's own lines go to :func:`console`, a copy of the standard
error taken before. What Ray prints from the driver lands in the file whichever part of Ray prints it: its
``ray`` and ``ray.data`` loggers (the token-authentication notice of a new local cluster, Ray Data's execution
plans and the progress it logs every few seconds when its progress bars are off), the C++ core worker's own
lines (it writes its errors and warnings to standard error, and no setting sends them elsewhere), and what the
workers print, which Ray relays to the driver (an engine actor's "fatal engine failure" line, a model's weight
loading). An error that ends the run still reaches the console: it leaves the session as an exception, and the
command prints it once the descriptors are back. ``--verbose`` keeps Ray's output on the console instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

from stepback_ray.config import JobSpec
from stepback_ray.errors import StepbackError
from stepback_ray.storage import RunStore
from stepback_ray.storage.filesystems import is_local

LOG_FILE = "logs/ray.log"
"""Where a run's Ray output goes, under its output."""

_console: TextIO | None = None
"""The console while standard error points at the log file (None: standard error is the console)."""


def console() -> TextIO:
    """Where the run's own lines go: the console, also while Ray's output goes to the log file."""
    return _console if _console is not None else sys.stderr


def say(line: str) -> None:
    """One line of the run's own on the console."""
    print(line, file=console(), flush=True)


@contextlib.contextmanager
def ray_output_to_log(job: JobSpec) -> Iterator[str]:
    """Point this process's standard output and error at the run's ``logs/ray.log`` (appended to: a resumed run
    keeps its earlier sessions' lines) for the ``with`` block, and yield the file's path, which is named on the
    console first. An output on object storage gets a local file while the run lasts, copied there at the end."""
    global _console
    store = RunStore(job.output_uri, job.storage)
    if is_local(store.fs):
        path = store.path(LOG_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        say(f"logs: {path}")
    else:
        fd, path = tempfile.mkstemp(prefix="stepback-ray-", suffix=".log")
        os.close(fd)
        say(f"logs: {path} (copied to {store.uri_of(LOG_FILE)} at the end)")
    if _console is not None:  # already redirected (a session inside a session): nothing more to do
        yield path
        return
    sys.stdout.flush()
    sys.stderr.flush()
    colour = os.environ.get("RAY_COLOR_PREFIX")
    os.environ["RAY_COLOR_PREFIX"] = "0"  # the workers' lines Ray relays, without terminal colour codes in a file
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    shown = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
    try:
        with open(path, "ab") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            _console = shown
            try:
                yield path
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, original in saved.items():
                    os.dup2(original, fd)
                _console = None
    finally:
        for original in saved.values():
            os.close(original)
        shown.close()
        if colour is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = colour
        if not is_local(store.fs):
            _copy_log(store, path)


def _copy_log(store: RunStore, path: str) -> None:
    """The local log file of a run whose output is on object storage, copied there; where the copy fails, the
    file stays where it is and the console says so (the run's own outcome is not changed by it)."""
    try:
        with open(path, "rb") as f:
            store.write_bytes(LOG_FILE, f.read())
    except StepbackError as e:
        say(f"logs: not copied to {store.uri_of(LOG_FILE)} ({e}); kept at {path}")
        return
    os.remove(path)
