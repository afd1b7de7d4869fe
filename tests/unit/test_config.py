"""Job specs are validated up front, with errors that name the key."""

from __future__ import annotations

import os

import pytest
import yaml

from stepback_ray.config import load_job, parse_overrides
from stepback_ray.errors import ConfigError
from tests.support import REPO


def test_demo_spec_loads_and_resolves_paths_against_its_folder():
    job = load_job(REPO / "jobs" / "demo.yaml")
    assert job.task == "LaMP_5" and job.modes == ["none", "profile+rag"]
    assert job.input.questions == str(REPO / "data" / "samples" / "lamp5_arxiv_dev20_questions.json")
    assert job.output_uri == f"runs/demo/{job.run_id}"


def test_overrides(tmp_path):
    job = load_job(
        REPO / "jobs" / "demo.yaml", ["limit=5", "output=out/x", "engine.batch_size=4", "modes=[none]", "run_id=r1"]
    )
    assert job.limit == 5 and job.engine.batch_size == 4 and job.modes == ["none"] and job.run_id == "r1"
    assert job.output_uri == os.path.abspath("out/x")
    assert load_job(None, ["output=s3://b/p/{run_id}"], data=_minimal()).output_uri.startswith("s3://b/p/")
    assert parse_overrides(["a.b=1", "c=x y", "d="]) == [("a.b", 1), ("c", "x y"), ("d", None)]


def test_a_run_id_that_yaml_reads_as_a_number_or_a_date_is_taken_as_written():
    assert load_job(None, ["run_id=20261123"], data=_minimal()).run_id == "20261123"
    assert load_job(None, ["run_id=2026-11-23", "name=2026"], data=_minimal()).run_id == "2026-11-23"


def _minimal() -> dict:
    return {"name": "t", "task": "LaMP_5", "input": {"questions": "q.json"}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"engine": {"batchsize": 3}}, r"engine.batchsize: unknown key"),
        ({"colour": 1}, r"colour: unknown key"),
        ({"task": "LaMP_99"}, r"task: unknown task 'LaMP_99'"),
        ({"modes": ["none", "telepathy"]}, r"modes.1: Input should be"),
        ({"engine": {"batch_size": 0}}, r"engine.batch_size: Input should be greater than 0 \(got 0\)"),
        ({"limit": "many"}, r"limit: Input should be a valid integer"),
        ({"input": {"outputs": "o.json"}}, r"input: format lamp needs input.questions"),
        ({"input": {"format": "parquet"}}, r"input: format parquet needs input.path"),
        ({"name": "a b"}, r"name: String should match pattern"),
        ({"modes": ["none", "none"]}, r"modes: modes repeat"),
        ({"generation": {"min_new_tokens": 40}}, r"generation.min_new_tokens \(40\) is above the generation length"),
        ({"modes": ["pplug"], "pplug": {"checkpoint": "c"}, "engine": {"kind": "vllm"}}, r"enable_prompt_embeds"),
        ({"limit": 3, "input": {"format": "parquet", "path": "p"}}, r"limit applies to LaMP input only"),
        ({"output": "s3://b/{date}/{run_id}"}, r"output.*only \{name\} and \{run_id\} expand \(KeyError"),
    ],
)
def test_bad_specs_name_the_key(change, message):
    data = {**_minimal(), **change}
    with pytest.raises(ConfigError, match=message):
        load_job(None, data=data)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"job spec not found"):
        load_job(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_job(p)
    p.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(ConfigError, match=r"a YAML mapping"):
        load_job(p)
    with pytest.raises(ConfigError, match=r"--set 'oops': expected key=value"):
        load_job(REPO / "jobs" / "demo.yaml", ["oops"])


def test_secrets_stay_out_of_the_public_dict():
    job = load_job(None, data={**_minimal(), "storage": {"key": "AKIA-SECRET", "secret": "s3cr3t"}})
    text = str(job.public_dict())
    assert "AKIA-SECRET" not in text and "s3cr3t" not in text
    assert job.storage.key.get_secret_value() == "AKIA-SECRET"


def test_resume_compares_only_keys_that_change_results(tmp_path):
    """A run resumed after an out-of-memory crash with smaller batches, or with the fault switched off, goes on;
    one with another model, mode or prompt setting is refused, naming the key."""
    from stepback_ray.config import SPEED_ONLY_KEYS
    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline import check_resume
    from stepback_ray.storage import RunStore

    base = [f"output={tmp_path / 'run'}", "run_id=r"]
    job = load_job(REPO / "jobs" / "demo.yaml", base)
    store = RunStore(job.output_uri, job.storage)
    assert check_resume(store, job) is False
    speed = [
        "engine.batch_size=2",
        "engine.max_batch_tokens=1024",
        "engine.vllm.gpu_memory_utilization=0.5",
        "engine.vllm.max_num_seqs=8",
        "storage.retries=9",
        "engine.dry_run_fail_marker=x",
        "engine.dry_run_tokens_per_s=5",
        "engine.call_timeout_s=5",
        "engine.max_restarts=0",
        "ray.engine_actors=2",
        "ray.engine_actor_gpus=1",
        "max_error_fraction=0.5",
        "ray.progress_bars=false",
    ]
    for o in speed:
        assert o.split("=")[0] in SPEED_ONLY_KEYS, o
        assert check_resume(store, load_job(REPO / "jobs" / "demo.yaml", [*base, o])) is True, o
    results = {
        "engine.model=packaged:qwen2.5-coder-0.5b-instruct": "engine.model",
        "modes=[none]": "modes",
        "profile.max_new_tokens=50": "profile.max_new_tokens",
        "generation.candidates=4": "generation.candidates",
        "engine.vllm.structured_output=false": "engine.vllm.structured_output",
        "ray.users_per_chunk=3": "ray.users_per_chunk",
        "retrieval.top_k=1": "retrieval.top_k",
    }
    for o, key in results.items():
        with pytest.raises(StepbackError, match=f"changed: {key}"):
            check_resume(store, load_job(REPO / "jobs" / "demo.yaml", [*base, o]))


def test_a_run_recorded_before_a_key_existed_resumes_while_the_key_holds_its_default(tmp_path):
    """A spec recorded by an older stepback-ray lacks the keys added since (here: the store's quality gate and a
    generation setting); at their defaults they change nothing, so the run resumes. Set to anything else, refused."""
    import json

    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline import check_resume
    from stepback_ray.storage import RunStore

    base = [f"output={tmp_path / 'run'}", "run_id=r"]
    job = load_job(REPO / "jobs" / "demo.yaml", base)
    store = RunStore(job.output_uri, job.storage)
    check_resume(store, job)
    recorded = json.loads((tmp_path / "run" / "_run_spec.json").read_text())
    del recorded["profile_store"]["gate"], recorded["generation"]["candidates"]
    (tmp_path / "run" / "_run_spec.json").write_text(json.dumps(recorded))
    assert check_resume(store, job) is True
    with pytest.raises(StepbackError, match="changed: profile_store.gate"):
        check_resume(
            store,
            load_job(
                REPO / "jobs" / "demo.yaml", [*base, "profile_store.uri=s", "profile_store.gate.min_ok_share=0.5"]
            ),
        )
    with pytest.raises(StepbackError, match="changed: generation.candidates"):
        check_resume(store, load_job(REPO / "jobs" / "demo.yaml", [*base, "generation.candidates=2"]))


def test_a_cluster_job_with_a_local_output_is_refused_unless_the_filesystem_is_shared(tmp_path):
    base = [f"output={tmp_path / 'run'}", "ray.address=127.0.0.1:6379"]
    with pytest.raises(ConfigError, match="local path the other nodes cannot write to"):
        load_job(REPO / "jobs" / "demo.yaml", base)
    assert load_job(REPO / "jobs" / "demo.yaml", [*base, "storage.shared_filesystem=true"]).storage.shared_filesystem
    assert load_job(REPO / "jobs" / "demo.yaml", ["output=s3://b/run", "ray.address=127.0.0.1:6379"]).ray.address


@pytest.mark.parametrize(
    "override, message",
    [
        ("limit=true", r"limit: Input should be a valid integer \(got True\)"),
        ("ray.num_shards=true", r"ray.num_shards.int: Input should be a valid integer \(got True\)"),
        ("generation.seed=false", r"generation.seed: Input should be a valid integer \(got False\)"),
        ("engine.batch_size=4.0", r"engine.batch_size: Input should be a valid integer \(got 4.0\)"),
        ("generation.temperature=true", r"generation.temperature: expected a number, got a boolean"),
    ],
)
def test_a_boolean_is_not_a_number(override, message):
    """YAML reads `true` as a boolean, which Python counts as 1: `--set limit=true` ran one user."""
    with pytest.raises(ConfigError, match=message):
        load_job(REPO / "jobs" / "demo.yaml", [override])


def test_numbers_still_load_as_written():
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        ["generation.temperature=1", "ray.engine_actor_cpus=2", "ray.num_shards=auto", "ray.engine_actors=3"],
    )
    assert job.generation.temperature == 1.0 and job.ray.engine_actor_cpus == 2.0 and job.ray.engine_actors == 3
    for spec in (REPO / "jobs").glob("*.yaml"):  # every example job still loads
        load_job(spec)
