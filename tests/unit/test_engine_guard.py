"""Engine failures sorted in the engine layer (engines/guard.py), without Ray: a prompt failure is one error row,
a fatal one is never written as rows."""

from __future__ import annotations

import pytest

from stepback_ray.engines.base import Completion, SamplingParams
from stepback_ray.engines.guard import EngineCalls, FatalEngineError, is_fatal


class FlakyEngine:
    """Rejects prompts holding 'bad'; any prompt holding 'oom' raises as torch does when the GPU is full."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        if any("oom" in p for p in prompts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("bad" in p for p in prompts):
            raise ValueError("prompt rejected")
        return [Completion(p.upper(), 1, 1, "stop", 0.0) for p in prompts]


def test_a_rejected_prompt_becomes_one_error_row_and_the_batch_is_kept():
    calls = EngineCalls(FlakyEngine(), timeout_s=None, in_actor=False)
    out = calls(["a", "bad one", "c"], SamplingParams())
    assert [c.text for c in out] == ["A", "", "C"]
    assert out[1].finish_reason == "error" and "prompt rejected" in out[1].error
    assert out[0].error is None and out[2].error is None


def test_a_fatal_failure_is_raised_never_written_as_rows():
    engine = FlakyEngine()
    calls = EngineCalls(engine, timeout_s=None, in_actor=False)
    with pytest.raises(FatalEngineError, match="out of memory"):
        calls(["a", "oom", "c"], SamplingParams())
    assert engine.calls == 1  # not retried prompt by prompt: a broken engine fails every prompt


@pytest.mark.parametrize(
    "exc,fatal",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("NCCL error: unhandled system error"), True),
        (type("EngineDeadError", (Exception,), {})("EngineCore encountered an issue"), True),
        (MemoryError(), True),
        (TimeoutError("call timed out"), True),
        (ValueError("prompt too long"), False),
        (KeyError("x"), False),
    ],
)
def test_fatal_failures_are_recognized_by_type_and_message(exc, fatal):
    assert is_fatal(exc) is fatal


def test_the_dry_run_engine_dies_after_n_calls_for_the_drills(tmp_path):
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines.dry_run import DryRunEngine

    log = tmp_path / "faults"
    engine = DryRunEngine(EngineConfig(kind="dry-run", dry_run_fatal_after=1, dry_run_fault_log=str(log)))
    calls = EngineCalls(engine, timeout_s=None, in_actor=False)
    assert calls(["hello"], SamplingParams())[0].error is None
    with pytest.raises(FatalEngineError, match="EngineDeadError"):
        calls(["hello"], SamplingParams())
    assert log.read_text().startswith("dead pid=")
