"""Concurrent engine calls in one engine actor, served by one engine call.

A chunk (a shard of a few users) is the unit of commit, so one block's engine call is small: a profile prompt per
user, or one prompt per query and mode. An engine steps many sequences for little more than the cost of one (a
decode step reads every weight once, whatever the batch), so small calls leave it underused. Ray Data hands an
engine actor ``ray.engine_tasks_in_flight`` blocks at once and, with ``ray.engine_coalesce``, runs their stage
calls side by side in threads; each hands its prompts to :class:`CoalescedCalls`, which sends the prompts of every
call waiting with the same sampling parameters to the engine as one call and gives each caller its own completions
back, in its order. Only one engine call runs at a time.

Before it starts a call, the first caller waits (at most ``gather_s``; in process, where blocks come one at a time,
not at all) for the other blocks the actor is serving to hand their prompts too: blocks that arrive together (the
usual case, queued while the engine loads or works) go in one call, and a block that is doing CPU work between two
calls delays the others by ``gather_s`` at most.
Greedy outputs do not depend on the grouping beyond the engines' own batch effects (the transformers engine's texts
are the same, tested). Sampled calls (temperature above 0) are never merged: their draws come from a generator
seeded per call, so each block's samples stay what they are when it runs alone. A failure reaches every caller of
the call it belongs to, and ``engine.call_timeout_s`` bounds a merged call as a whole.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams

GATHER_S = 0.25
"""How long the first waiting call waits for the actor's other blocks to hand their prompts."""

SETTLE_S = 0.05
"""How long it waits in any case (within ``gather_s``) for blocks that arrive with it."""

PASS_START_S = 3.0
"""How long the first call of a pass waits for the pass's first blocks (:meth:`CoalescedCalls.expect`)."""


@dataclass(eq=False)
class _Pending:
    requests: list[Prompt | Request]
    params: SamplingParams
    done: bool = False
    result: list[Completion] = field(default_factory=list)
    error: BaseException | None = None


class CoalescedCalls:
    """``generate(requests, params)`` for the threads of one engine actor: greedy calls waiting together with
    equal ``params`` go to ``call`` as one. Each block a stage serves is wrapped in :meth:`serving`, so the first caller
    knows how many blocks may still hand prompts."""

    def __init__(self, call: Callable[[list, SamplingParams], list[Completion]], gather_s: float = GATHER_S):
        self.call, self.gather_s = call, gather_s
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._busy = False
        self._serving = 0
        self._expected, self._expect_until = 0, 0.0
        #: engine calls made and the caller calls they served (what coalescing did, for tests and logs)
        self.engine_calls = self.caller_calls = 0

    def expect(self, blocks: int, within_s: float = PASS_START_S) -> None:
        """``blocks`` more blocks are on their way (a pass starting on an engine that is already loaded): the
        first call waits up to ``within_s`` for them to arrive and hand their prompts. A pass's own engine actor
        gets its first blocks together, queued while it loads; an engine kept from an earlier pass
        (:mod:`stepback_ray.pipeline.engine_host`) is idle when the first arrives, and without this would run it
        alone and the next one after it: two decodes of half the batch. Calls that are not gathered
        (``gather_s`` 0: served one by one) wait for nothing."""
        if self.gather_s <= 0:
            return
        with self._cond:
            self._expected, self._expect_until = max(0, blocks), time.monotonic() + within_s

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around one block's work in a stage: while it runs, it may still hand prompts."""
        with self._cond:
            self._serving += 1
            self._expected = max(0, self._expected - 1)
        try:
            yield
        finally:
            with self._cond:
                self._serving -= 1
                self._cond.notify_all()

    def __call__(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        mine = _Pending(list(requests), params)
        with self._cond:
            self._waiting.append(mine)
            self._cond.notify_all()
            while not mine.done and (self._busy or self._waiting[0] is not mine):
                self._cond.wait()
            if mine.done:  # served in another caller's engine call
                return self._result(mine)
            self._busy = True
            start = time.monotonic()
            sampled = params.temperature > 0  # its draws would depend on which blocks share the call: alone
            settle = start + min(SETTLE_S, self.gather_s) if self._serving and not sampled else start
            deadline = start + (0.0 if sampled else self.gather_s)
            if self._expected and not sampled:
                deadline = max(deadline, self._expect_until)
            # blocks being served that have not handed prompts yet (each waiting call is one such block's), and
            # those still arriving: the threads of blocks sent together start a few milliseconds apart
            while (left := deadline - time.monotonic()) > 0:
                missing = self._serving + self._expected > len(self._waiting)
                settling = settle - time.monotonic()
                if not missing and settling <= 0:
                    break
                self._cond.wait(left if missing else min(left, settling))
            self._expected = 0  # only the pass's first call waits for its blocks
            batch = [mine] if sampled else [p for p in self._waiting if p.params == params]
            self._waiting = [p for p in self._waiting if p not in batch]
        try:
            requests = [r for p in batch for r in p.requests]
            done = self.call(requests, params)
            if len(done) != len(requests):
                raise RuntimeError(f"the engine returned {len(done)} completions for {len(requests)} prompts")
            start = 0
            for p in batch:
                p.result, start = done[start : start + len(p.requests)], start + len(p.requests)
        except BaseException as e:  # every caller of this engine call learns of its failure
            for p in batch:
                p.error = e
        with self._cond:
            self.engine_calls += 1
            self.caller_calls += len(batch)
            for p in batch:
                p.done = True
            self._busy = False
            self._cond.notify_all()
        return self._result(mine)

    @staticmethod
    def _result(p: _Pending) -> list[Completion]:
        if p.error is not None:
            raise p.error
        return p.result
