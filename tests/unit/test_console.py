"""What a run shows on the console: a progress line per pass (in place on a terminal, a line per tenth of the
chunks otherwise), Ray's output in the run's log file instead, and the run report's seconds chart fed seconds
only. No Ray: the log redirection is checked with plain writes to the process's standard output and error."""

from __future__ import annotations

import io
import os

import pytest

from stepback_ray.cli import build_parser
from stepback_ray.config import load_job
from stepback_ray.evaluation.figures import pass_chart_inputs
from stepback_ray.evaluation.report_parts import timings_section
from stepback_ray.pipeline.console import LOG_FILE, console, ray_output_to_log, say
from stepback_ray.pipeline.progress import PassProgress

# a demo run's timings as the manifest records them: seconds beside counts
TIMINGS = {
    "read_s": 0.673,
    "ray_start_s": 4.8,
    "profile_pass_s": 80.889,
    "profile_engines_started": 1,
    "profile_first_engine_ready_s": 9.14,
    "profile_model_load_s": 6.445,
    "profile_engine_cpu_s": 125.214,
    "profile_engine_preemptions": 74715,
    "between_passes_s": 0.173,
    "generation_pass_s": 64.464,
    "generation_engine_cpu_s": 107.137,
    "generation_engine_preemptions": 62492,
    "shutdown_s": 1.432,
    "total_s": 152.44,
}


def test_the_seconds_chart_gets_seconds_only_and_the_counts_go_to_the_timings_table():
    wall, within = pass_chart_inputs(TIMINGS)
    assert wall == {
        "read": 0.673,
        "ray start": 4.8,
        "profile pass": 80.889,
        "between passes": 0.173,
        "generation pass": 64.464,
        "shutdown": 1.432,
    }
    assert within == {
        "profile first engine ready": 9.14,
        "profile model load": 6.445,
        "profile engine cpu": 125.214,
        "generation engine cpu": 107.137,
    }
    table = timings_section(TIMINGS)
    assert "<td>profile engine preemptions</td><td>74715</td>" in table
    assert "<td>profile engines started</td><td>1</td>" in table and "total 152.4 s" in table


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_off_a_terminal_a_pass_prints_a_line_per_tenth_of_its_chunks():
    out, clock = io.StringIO(), Clock()
    progress = PassProgress("profile", 25, "users", stream=out, clock=clock)
    for _ in range(25):
        clock.now += 2.0
        progress.chunk_done(4)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "profile pass: 25 chunks to do" and len(lines) == 1 + 10
    assert lines[1] == "profile pass: 3/25 chunks, 12 users, 2.0 users/s, ETA 44 s"
    assert lines[-1] == "profile pass: 25/25 chunks, 100 users, 2.0 users/s, done in 50 s"
    assert "\r" not in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_line_is_rewritten_in_place_and_ended_once():
    out, clock = Terminal(), Clock()
    progress = PassProgress("generation", 3, "rows", stream=out, clock=clock)
    for _ in range(3):
        clock.now += 65.0
        progress.chunk_done(10)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("done in 3m15s\x1b[K\n")
    assert "generation pass: 1/3 chunks, 10 rows, 0.15 rows/s, ETA 2m10s" in text


def test_ray_output_goes_to_the_run_log_and_the_run_s_own_lines_to_the_console(tmp_path, capfd):
    data = {"name": "c", "task": "LaMP_5", "input": {"questions": "q.json"}, "output": str(tmp_path)}
    job = load_job(None, ["engine.kind=dry-run"], data=data)
    with ray_output_to_log(job) as path:
        os.write(1, b"a worker's line, relayed\n")
        os.write(2, b"[E core_worker.cc] a line of Ray's C++\n")
        say("profile pass: 1/2 chunks")
        assert console() is not None
    os.write(2, b"after the session\n")
    out, err = capfd.readouterr()
    assert path == str(tmp_path / LOG_FILE)
    assert err.splitlines() == [f"logs: {path}", "profile pass: 1/2 chunks", "after the session"] and out == ""
    assert open(path).read() == "a worker's line, relayed\n[E core_worker.cc] a line of Ray's C++\n"


@pytest.mark.parametrize("command", ["run", "profile", "plan", "train-pplug"])
def test_the_job_commands_take_verbose(command):
    parser = build_parser()
    assert parser.parse_args([command, "job.yaml", "--verbose"]).verbose is True
    assert parser.parse_args([command, "job.yaml"]).verbose is False


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])
def test_a_session_the_run_starts_sends_ray_s_output_to_the_log_only_when_quiet(tmp_path, capfd, monkeypatch, quiet):
    """Ray itself replaced by what it does to the console: its C++ and Python lines written to standard error."""
    import ray

    from stepback_ray.pipeline.on_ray import ray_session

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(ray, "init", lambda **kw: started.append(os.write(2, b"Token authentication is enabled\n")))
    monkeypatch.setattr(ray, "shutdown", lambda: os.write(2, b"core_worker.cc E shutting down\n"))
    data = {"name": "c", "task": "LaMP_5", "input": {"questions": "q.json"}, "output": str(tmp_path)}
    with ray_session(load_job(None, [], data=data), quiet=quiet):
        say("profile pass: 2 chunks to do")
    err = capfd.readouterr().err
    log = tmp_path / LOG_FILE
    if quiet:
        assert err.splitlines() == [f"logs: {log}", "profile pass: 2 chunks to do"]
        assert log.read_text() == "Token authentication is enabled\ncore_worker.cc E shutting down\n"
    else:
        assert "Token authentication" in err and "core_worker.cc" in err and not log.exists()
