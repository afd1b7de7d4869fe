"""Bad input through the real command: one line on stderr naming file/record/field, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import FIXTURES, REPO, stepback, write_lamp


def _bad_inputs(tmp_path):
    not_lamp = tmp_path / "x_questions.json"
    not_lamp.write_text(json.dumps({"hello": "world"}))
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    q_nogold, o_nogold = write_lamp(tmp_path, "nogold", qs, "LaMP_5", {"310": "a", "312": "c"})
    return [
        ([f"input.questions={tmp_path / 'missing_questions.json'}"], r"missing_questions.json: file not found"),
        ([f"input.questions={not_lamp}", "input.outputs=null"], r"x_questions.json: expected a JSON list"),
        (
            [f"input.questions={q_nogold}", f"input.outputs={o_nogold}"],
            r"nogold_outputs.json: record '311': field 'id': question has no gold output",
        ),
        (["engine.batch_size=-1"], r"engine.batch_size: Input should be greater than 0 \(got -1\)"),
        (["engine.model=packaged:nonexistent"], r"unknown packaged model 'nonexistent'"),
        (["engine.model=/no/such/model/folder"], r"cannot load the tokenizer of model '/no/such/model/folder'"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_is_one_line_without_traceback(tmp_path, case):
    overrides, pattern = _bad_inputs(tmp_path)[case]
    args = ["run", "jobs/demo.yaml", f"--set=output={tmp_path / 'out'}"]
    for o in overrides:
        args += ["--set", o]
    proc = stepback(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1
    import re

    assert re.search(pattern, err_lines[0]), err_lines[0]


def test_unknown_subcommand_and_help():
    assert stepback("--help").returncode == 0
    assert stepback("frobnicate").returncode == 2


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "fast"])
def test_plan_throughput_must_be_a_finite_positive_number_before_any_work(value):
    import time

    t0 = time.time()
    proc = stepback("plan", "jobs/demo.yaml", f"--tokens-per-s={value}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--tokens-per-s" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("stepback plan: error:")
    assert time.time() - t0 < 30  # refused by the argument parser, not after a dry run


def test_a_bad_spec_fails_before_the_heavy_imports(tmp_path):
    """A config error is reported in about a second: nltk, scipy, sklearn, torch and ray are imported only once
    the spec is valid (before, `stepback run bad.yaml` took 2-3 s of CPU importing them first)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: LaMP_5\ninput: {questions: q.json}\nbogus: 1\n")
    code = (
        "import sys\nfrom stepback_ray.cli import main\n"
        f"for cmd in ('run', 'profile', 'plan', 'train-pplug'):\n    assert main([cmd, {str(bad)!r}]) == 2\n"
        "print(sorted(m for m in ('nltk', 'scipy', 'sklearn', 'torch', 'ray', 'pyarrow') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert proc.stderr.count("bad.yaml: bogus: unknown key") == 4
