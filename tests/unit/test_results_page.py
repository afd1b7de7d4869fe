"""The results page is generated from the benchmarks' records and cannot drift from them."""

from __future__ import annotations

import json

from benchmarks import results_page


def test_the_results_page_is_what_the_records_give():
    assert results_page.main(["--check"]) == 0, "run: python -m benchmarks.results_page --write"


def test_a_record_changed_after_the_page_was_written_fails_the_check(tmp_path, capsys):
    root, page = tmp_path / "results", tmp_path / "results.md"
    nightly = {
        "date": "2026-11-23",
        "machine": "m",
        "command": "c",
        "users": 200,
        "set": "lamp5_arxiv",
        "changed": 10,
        "model": "x",
        "runs": [
            {"run": "full", "recomputed": 200, "carried": 0, "wall_s": 800.0},
            {"run": "nightly", "recomputed": 10, "carried": 190, "wall_s": 100.0},
        ],
    }
    (root / "nightly").mkdir(parents=True)
    (root / "nightly" / "default.json").write_text(json.dumps(nightly))
    args = ["--results", str(root), "--page", str(page)]
    assert results_page.main(["--write", *args]) == 0
    text = page.read_text()
    assert "| nightly | 10 | 190 | 100.0 |" in text and "nightly / full = 0.125." in text
    assert "Date: 2026-11-23; machine: m; command: `c`." in text
    assert results_page.main(["--check", *args]) == 0
    nightly["runs"][1]["wall_s"] = 120.0
    (root / "nightly" / "default.json").write_text(json.dumps(nightly))
    assert results_page.main(["--check", *args]) == 1
    assert "results_page --write" in capsys.readouterr().err


def test_an_engine_record_without_cached_counts_says_its_figures_are_tokens_sent(tmp_path):
    """A vLLM figure from before cached tokens were counted is not held to the limit as if it were compute."""
    path = {
        "prompts": 4,
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "wall_s": 1.0,
        "tokens_per_s": 1100.0,
        "prompts_per_s": 4.0,
        "load_s": 9.0,
        "limit": {"matmul_gflops": 200.0, "dtype": "fp32", "threads": 2, "gflop_per_token": 0.25},
    }
    record = {
        "date": "2026-12-07",
        "machine": "m",
        "command": "c",
        "model": "x",
        "device": "cpu",
        "prompts": 4,
        "new_tokens": {"generation": 25},
        "results": {"generation": {"vllm": {"raw": path}}},
    }
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "vllm.json").write_text(json.dumps(record))
    text = results_page.render(tmp_path)
    # 1,100 tokens sent per second against an 800 tokens/s limit: over it, so not a computed figure
    assert "| vllm | raw | 4 | 1,100 | not recorded | 1.0 | 1100.0 | not recorded | sent: 1.375; computed not " in text
    record["results"]["generation"]["vllm"]["raw"]["cached_prompt_tokens"] = 600
    (tmp_path / "engines" / "vllm.json").write_text(json.dumps(record))
    assert "| vllm | raw | 4 | 1,100 | 500 | 1.0 | 1100.0 | 500.0 | **0.625** |" in results_page.render(tmp_path)
