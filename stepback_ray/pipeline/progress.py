"""What a run shows on the console while a pass runs: one progress line per pass, printed by the driver as the
pass's chunks are committed (chunks done of the pass's total, the rows they hold, rows per second, the time
left).

On a terminal the line is rewritten in place (``\\r``) at each chunk and ends with the pass; written to a file or a
pipe (a cluster job's log, CI), a line is printed when the pass starts and then each time another tenth of its
chunks is done, so a long pass leaves about a dozen lines, not one per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from stepback_ray.pipeline.console import console

STEPS = 10
"""Lines a pass prints off a terminal besides its first: one per tenth of its chunks."""


def duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``2h07m``: short, for a line that is rewritten."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PassProgress:
    """The progress line of one pass over ``total`` chunks; ``unit``: what the committed rows are (the users of a
    per-user pass, the generation rows of a query pass). ``stream``: the console (:func:`console`); ``clock``:
    seconds, monotonic (a test passes its own)."""

    def __init__(
        self,
        name: str,
        total: int,
        unit: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.total, self.unit = name, total, unit
        self.stream = stream if stream is not None else console()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.rows = 0
        self._step = 0
        self._open = False  # a terminal line written without its newline yet
        self._show(f"{self.name} pass: {self.total} chunks to do")

    def line(self) -> str:
        """The line as it stands: chunks done of the total, rows, rows per second, the time left (or taken)."""
        elapsed = max(self.clock() - self.started, 1e-9)
        text = f"{self.name} pass: {self.done}/{self.total} chunks, {self.rows} {self.unit}"
        if self.done:
            rate = self.rows / elapsed
            text += f", {rate:.2f} {self.unit}/s" if rate < 1 else f", {rate:.1f} {self.unit}/s"
        if self.done == self.total:
            return text + f", done in {duration(elapsed)}"
        if self.done:
            return text + f", ETA {duration(elapsed / self.done * (self.total - self.done))}"
        return text

    def chunk_done(self, rows: int) -> None:
        """One more chunk committed, holding ``rows`` rows."""
        self.done += 1
        self.rows += rows
        step = self.done * STEPS // max(self.total, 1)
        if self.tty or step > self._step:
            self._step = step
            self._show(self.line())

    def finish(self) -> None:
        """The pass ended: a terminal's line gets its newline."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def _show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._open = True
            if self.done == self.total and self.done:
                self.finish()
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
