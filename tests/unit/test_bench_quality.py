"""bench_quality's PSW comparison: the jobs a set runs, the paired differences it reports and its table."""

from __future__ import annotations

import pytest

from benchmarks import bench_quality


def test_a_psw_set_runs_single_then_the_control_then_the_rest_then_the_controls_random_profile():
    jobs = bench_quality.psw_jobs(["single", "concat", "lead-merge", "byline-rag"], "lead-merge")
    assert jobs == [
        ("single", "single", ["none", "rag", "profile+rag"]),
        ("lead-merge", "lead-merge", ["profile+rag"]),
        ("concat", "concat", ["profile+rag"]),
        ("byline-rag", "byline-rag", ["profile+rag"]),
        ("random-profile-lead-merge", "lead-merge", ["random-profile"]),
    ]
    variants = [bench_quality.psw_variant(s, m) for _, s, ms in jobs for m in ms]
    assert variants == ["none", "rag", "single", "lead-merge", "concat", "byline-rag", "random-profile"]


def _record(pending=()):
    q = [f"q{i}" for i in range(6)]
    scores = {
        "none": {k: [0.2, 0.2] for k in q},
        "single": {k: [0.4, 0.3] for k in q},
        "byline-rag": {k: [0.5, 0.4] for k in q},
        "random-profile": {k: [0.3, 0.3] for k in q},
    }
    return {
        "set": "psw_title",
        "task": "PSW_title",
        "users": 6,
        "queries": 6,
        "strategies": ["single", "byline-rag"],
        "control": "byline-rag",
        "scores": scores,
        "costs": {v: {"llm_calls": 1.0, "prompt_tokens": 800.0} for v in scores},
        "wall_s": 60.0,
        "date": "2026-01-01",
        "command": "--sets psw_title --users 6",
        "overrides": [],
        "engine": "vllm serve",
        "pending": list(pending),
    }


def test_psw_differences_pair_each_strategy_with_single_and_none_and_the_control_with_random_profile():
    d = bench_quality.differences(_record())
    assert list(d) == ["single - none", "byline-rag - single", "byline-rag - none", "byline-rag - random-profile"]
    assert d["byline-rag - single"]["mean"] == pytest.approx(0.1) and d["byline-rag - single"]["n"] == 6


def test_the_psw_table_shows_the_command_the_costs_and_what_is_still_to_run():
    text = "\n".join(bench_quality.set_markdown(_record(pending=["concat"])))
    assert "`python -m benchmarks.bench_quality --sets psw_title --users 6`" in text
    assert "6 queries, greedy, vllm serve engine," in text
    assert "| byline-rag | 0.5000 [0.5000, 0.5000] | 0.4000 [0.4000, 0.4000] | 1.00 / 800 |" in text
    assert "random-profile (byline-rag, every author's profile swapped)" in text
    assert "Still to run: concat." in text


def test_a_served_engine_reaches_every_job_but_not_the_saved_overrides(monkeypatch, tmp_path):
    """``--serve-vllm``: each job's spec sends its calls to the server (engine.kind openai at its URL), while the
    record keeps only the overrides given with --set, so a later run on the in-process engine matches it."""
    import types

    import stepback_ray.pipeline as pipeline

    specs = []

    def fake_run(spec):
        specs.append(spec)
        return types.SimpleNamespace(manifest={"counts": {"queries": 2}}, metrics={})

    monkeypatch.setattr(pipeline, "run_job", fake_run)
    monkeypatch.setattr(bench_quality, "_scores", lambda out: {m: {"q": [0.1, 0.1]} for m in bench_quality.MODES})
    monkeypatch.setattr(bench_quality, "_costs", lambda out, task: {m: {} for m in bench_quality.MODES})
    served = ["engine.kind=openai", "engine.openai.base_url=http://127.0.0.1:8471/v1", "engine.openai.api_key_env=null"]
    saved = bench_quality.run_set(
        "psw_title", 2, tmp_path, ["executor=in-process"], [], "cmd", tmp_path / "runs", lambda s: None,
        ["single", "lead-merge"], "lead-merge", served,
    )  # fmt: skip
    assert [s.engine.kind for s in specs] == ["openai"] * 3
    assert {s.engine.openai.base_url for s in specs} == {"http://127.0.0.1:8471/v1"}
    assert saved["overrides"] == ["executor=in-process"] and saved["engine"] == "vllm serve"
    assert saved["pending"] == []


def test_serve_vllm_uses_a_server_already_up_on_its_port_and_starts_none(monkeypatch, tmp_path):
    """A server left up (``python -m benchmarks.vllm_serve``) on the benchmark's port is used as it is; starting a
    second one on a port already served is refused before any process starts."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks import vllm_serve

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.end_headers()
            self.wfile.write(b'{"data": [{"id": "packaged:qwen2.5-coder-0.5b-instruct"}]}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    real_serving = vllm_serve.serving

    def no_start(*args, **kwargs):
        raise AssertionError("a second server was started")

    monkeypatch.setattr(bench_quality, "SERVE_PORT", port)
    monkeypatch.setattr(vllm_serve, "serving", no_start)
    try:
        with bench_quality.served(".venv-vllm", "packaged:qwen2.5-coder-0.5b-instruct", tmp_path) as overrides:
            assert f"engine.openai.base_url=http://127.0.0.1:{port}/v1" in overrides
        with pytest.raises(SystemExit, match="serves packaged:qwen2.5-coder-0.5b-instruct, not packaged:smollm2"):
            with bench_quality.served(".venv-vllm", "packaged:smollm2-135m-instruct", tmp_path):
                pass  # another model's server is not used as this one
        with pytest.raises(RuntimeError, match="already served"):
            with real_serving(tmp_path / "no-python", "model", "model", tmp_path / "log", port=port):
                pass
    finally:
        server.shutdown()
        server.server_close()
    with bench_quality.served(None, "model", tmp_path) as overrides:
        assert overrides == []
