"""Concurrent engine calls of one engine actor merged into one engine call (engines/coalesce.py), on threads as
Ray Data runs an actor's blocks in flight; through Ray Data itself: tests/ray/test_coalesce.py."""

from __future__ import annotations

import threading
import time

import pytest

from stepback_ray.engines import SamplingParams
from stepback_ray.engines.base import Completion
from stepback_ray.engines.coalesce import CoalescedCalls


class Recorder:
    """An engine call that records each call's prompts and answers each prompt with its own text."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, prompts, params):
        self.calls.append(list(prompts))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError("engine dead")
        return [Completion(f"{p}/{params.max_new_tokens}", 1, 1, "stop", 0.0) for p in prompts]


def _blocks(
    calls: CoalescedCalls, work: dict[str, list[tuple[list[str], SamplingParams]]], start_gap: float = 0.0
) -> dict[str, list]:
    """Each block (a thread, as Ray Data runs an engine stage's calls) makes its engine calls in turn inside
    ``serving``; returns each block's completions or the exception it got."""
    out: dict[str, list] = {}
    arrived = threading.Barrier(len(work)) if not start_gap else None

    def block(name, steps):
        with calls.serving():
            if arrived is not None:  # every block is being served before any calls: the gather is deterministic
                arrived.wait(10)
            got = []
            try:
                for prompts, params in steps:
                    got.append([c.text for c in calls(prompts, params)])
            except Exception as e:  # noqa: BLE001 - recorded for the test
                got.append(e)
            out[name] = got

    threads = []
    for name, steps in work.items():
        threads.append(threading.Thread(target=block, args=(name, steps), daemon=True))
        threads[-1].start()
        time.sleep(start_gap)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a block never got its answers"
    return out


def test_blocks_in_flight_together_make_one_engine_call_and_each_gets_its_own_answers():
    engine = Recorder(delay=0.05)
    calls = CoalescedCalls(engine, gather_s=2.0)
    p = SamplingParams(max_new_tokens=8)
    out = _blocks(calls, {"a": [(["a1", "a2"], p)], "b": [(["b1"], p)], "c": [(["c1", "c2", "c3"], p)]})
    assert out == {"a": [["a1/8", "a2/8"]], "b": [["b1/8"]], "c": [["c1/8", "c2/8", "c3/8"]]}
    assert len(engine.calls) == 1 and sorted(engine.calls[0]) == ["a1", "a2", "b1", "c1", "c2", "c3"]
    assert (calls.engine_calls, calls.caller_calls) == (1, 3)


def test_different_sampling_parameters_are_never_merged_and_follow_up_calls_merge_again():
    """Proposals then merges (two calls per block, the generation stage's shape); a block with other parameters
    is served in its own call."""
    engine = Recorder(delay=0.05)
    calls = CoalescedCalls(engine, gather_s=2.0)
    p, q = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=4)
    out = _blocks(
        calls, {"a": [(["a1"], p), (["a-merge"], p)], "b": [(["b1"], p), (["b-merge"], p)], "c": [(["c1"], q)]}
    )
    assert out == {"a": [["a1/8"], ["a-merge/8"]], "b": [["b1/8"], ["b-merge/8"]], "c": [["c1/4"]]}
    assert sorted(map(sorted, engine.calls)) == [["a-merge", "b-merge"], ["a1", "b1"], ["c1"]]


def test_a_failed_engine_call_reaches_every_block_it_served_and_no_block_waits_forever():
    engine = Recorder(fail_on="b1")
    calls = CoalescedCalls(engine, gather_s=2.0)
    p = SamplingParams()
    out = _blocks(calls, {"a": [(["a1"], p)], "b": [(["b1"], p)]})
    assert set(out) == {"a", "b"} and all(isinstance(got[-1], RuntimeError) for got in out.values())
    assert engine.calls == [["a1", "b1"]] or engine.calls == [["b1", "a1"]]
    assert calls(["alone"], p)[0].text == "alone/32"  # the next call is served


def test_sampled_calls_are_never_merged():
    """Their draws come from a generator seeded per engine call: merged, a block's samples would depend on which
    blocks shared its call."""
    engine = Recorder(delay=0.05)
    calls = CoalescedCalls(engine, gather_s=2.0)
    p = SamplingParams(max_new_tokens=8, temperature=0.7, n=2)
    out = _blocks(calls, {"a": [(["a1", "a2"], p)], "b": [(["b1"], p)]})
    assert out == {"a": [["a1/8", "a2/8"]], "b": [["b1/8"]]}
    assert sorted(engine.calls) == [["a1", "a2"], ["b1"]]


def test_an_engine_that_returns_too_few_completions_fails_every_caller():
    calls = CoalescedCalls(lambda prompts, params: [Completion("x", 1, 1, "stop", 0.0)], gather_s=2.0)
    out = _blocks(calls, {"a": [(["a1"], SamplingParams())], "b": [(["b1"], SamplingParams())]})
    assert all(
        isinstance(got[-1], RuntimeError) and "1 completions for 2 prompts" in str(got[-1]) for got in out.values()
    )


def test_outside_an_actor_a_call_goes_straight_through():
    """In process (no ``serving`` blocks), nothing waits to gather: one call, one engine call, at once."""
    engine = Recorder()
    calls = CoalescedCalls(engine, gather_s=30.0)
    t0 = time.monotonic()
    assert [c.text for c in calls(["x", "y"], SamplingParams(max_new_tokens=2))] == ["x/2", "y/2"]
    assert time.monotonic() - t0 < 1.0 and engine.calls == [["x", "y"]]


def test_a_block_busy_elsewhere_delays_the_call_by_the_gather_time_at_most():
    engine = Recorder()
    calls = CoalescedCalls(engine, gather_s=0.3)
    release = threading.Event()

    def busy_block():
        with calls.serving():
            release.wait(5)

    t = threading.Thread(target=busy_block)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with calls.serving():
        calls(["x"], SamplingParams())
    waited = time.monotonic() - t0
    release.set()
    t.join()
    assert 0.25 <= waited < 2.0


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_engine_stage_is_configured_for_side_by_side_blocks(coalesce):
    """On Ray, coalescing runs the engine stage's blocks in flight in threads of the actor (Ray Data's
    ``max_concurrent_calls_per_actor`` with true multithreading); off, one block at a time."""
    from stepback_ray.config import JobSpec
    from stepback_ray.pipeline.on_ray import engine_compute

    job = JobSpec.model_validate(
        {
            "name": "t",
            "task": "LaMP_5",
            "input": {"format": "lamp", "questions": "q.json"},
            "modes": ["none"],
            "ray": {"engine_tasks_in_flight": 3, "engine_coalesce": coalesce},
        }
    )
    compute = engine_compute(job, actors=2)
    assert compute.max_tasks_in_flight_per_actor == 3
    assert compute.max_concurrent_calls_per_actor == (3 if coalesce else None)
    assert bool(compute._enable_true_multi_threading) is coalesce


def test_a_pass_starting_on_a_loaded_engine_waits_briefly_for_its_first_blocks():
    """An engine kept from an earlier pass is idle when a pass's first block arrives; told that two blocks come
    (``expect``), the first waits for the second (0.6 s later) and they share one call. Untold, or once the first
    call has gone, each goes alone."""
    p = SamplingParams(max_new_tokens=8)
    work = {"a": [(["a1"], p)], "b": [(["b1"], p)]}
    told, untold = Recorder(), Recorder()
    calls = CoalescedCalls(told, gather_s=0.25)
    calls.expect(2, within_s=5.0)
    assert _blocks(calls, work, start_gap=0.6) == {"a": [["a1/8"]], "b": [["b1/8"]]}
    assert told.calls == [["a1", "b1"]]
    assert _blocks(calls, {"c": [(["c1"], p)], "d": [(["d1"], p)]}, start_gap=0.6) and len(told.calls) == 3
    assert _blocks(CoalescedCalls(untold, gather_s=0.25), work, start_gap=0.6) and untold.calls == [["a1"], ["b1"]]


def test_an_expected_block_that_never_comes_delays_the_first_call_by_the_bound_only():
    engine = Recorder()
    calls = CoalescedCalls(engine, gather_s=0.25)
    calls.expect(2, within_s=0.5)
    t0 = time.monotonic()
    assert _blocks(calls, {"a": [(["a1"], SamplingParams())]}, start_gap=0.01) == {"a": [["a1/32"]]}
    assert 0.4 < time.monotonic() - t0 < 3.0 and engine.calls == [["a1"]]
    one_by_one = CoalescedCalls(engine, gather_s=0.0)  # calls served one by one wait for no block
    one_by_one.expect(2, within_s=30.0)
    t0 = time.monotonic()
    assert _blocks(one_by_one, {"b": [(["b1"], SamplingParams())]}, start_gap=0.01) == {"b": [["b1/32"]]}
    assert time.monotonic() - t0 < 10.0
