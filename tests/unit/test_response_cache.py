"""``engine.response_cache``: greedy answers kept across engine calls and jobs (engines/memo.py)."""

from __future__ import annotations

from stepback_ray.config import EngineConfig
from stepback_ray.engines import Completion, Request, SamplingParams, build_engine
from stepback_ray.engines.memo import MemoEngine


class Counting:
    """An engine that answers each prompt with its text reversed and counts what it computed."""

    model_id, max_context, family = "m", 100, "chat"

    def __init__(self):
        self.computed: list[str] = []
        self.closed = False

    def generate(self, requests, params):
        out = []
        for r in requests:
            p = r.prompt if isinstance(r, Request) else r
            self.computed.append(p)
            err = "boom" if p == "fail" else None
            out.append(Completion(p[::-1], len(p), 3, "error" if err else "stop", 0.5, error=err))
        return out

    def close(self):
        self.closed = True


def test_a_greedy_answer_is_computed_once_across_engines_sharing_the_file(tmp_path):
    path, config = str(tmp_path / "c" / "answers.sqlite"), EngineConfig(kind="dry-run")
    greedy = SamplingParams(max_new_tokens=8)
    first = MemoEngine(Counting(), config, path)
    a = first.generate(["abc", "de", "fail"], greedy)
    assert [c.text for c in a] == ["cba", "ed", "liaf"] and a[0].cached_tokens == 0
    second = MemoEngine(inner := Counting(), config, path)  # another job's engine, the same file
    b = second.generate(["de", "xyz", "abc", "fail"], greedy)
    assert [c.text for c in b] == ["ed", "zyx", "cba", "liaf"]
    assert inner.computed == ["xyz", "fail"]  # a failed answer is never kept
    assert b[0].seconds == 0.0 and b[0].cached_tokens == b[0].prompt_tokens == 2 and b[0].completion_tokens == 3
    assert (second.hits, second.misses) == (2, 2) and second.max_context == 100  # the rest is the inner engine's
    second.generate(["abc"], SamplingParams(max_new_tokens=9))  # other settings: another key
    second.generate(["abc"], SamplingParams(max_new_tokens=8, temperature=0.7))  # sampled: never kept
    second.generate([Request("abc", soft_tokens=[[0.0]])], greedy)  # soft tokens: never kept
    other_model = MemoEngine(third := Counting(), EngineConfig(kind="dry-run", model="other"), path)
    other_model.generate(["abc"], greedy)
    assert inner.computed[2:] == ["abc", "abc", "abc"] and third.computed == ["abc"]
    second.close()
    assert inner.closed


def test_build_engine_wraps_the_engine_only_when_asked(tmp_path):
    assert not isinstance(build_engine(EngineConfig(kind="dry-run")), MemoEngine)
    cached = build_engine(EngineConfig(kind="dry-run", response_cache=str(tmp_path / "r.sqlite")))
    assert isinstance(cached, MemoEngine)
    p = SamplingParams(max_new_tokens=4)
    assert [c.text for c in cached.generate(["hello"], p)] == [c.text for c in cached.generate(["hello"], p)]
    assert cached.hits == 1
    cached.close()
