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


# Keys whose new value needs other keys set with it to validate (the others are found by trying values in turn).
# The companions of a speed-only key are speed-only too, so that its resume still goes on.
COMPANIONS = {
    "task": ["task=LaMP_4"],
    "modes": ["modes=[none]"],
    "input.format": ["input.format=parquet", "input.path=p", "limit=null"],
    "ray.address": ["ray.address=127.0.0.1:6379", "storage.shared_filesystem=true"],
    "profile_store.gate.min_lift": ["profile_store.uri=s", "profile_store.gate.min_lift=0.1"],
    "engine.openai.base_url": ["engine.openai.base_url=http://127.0.0.2:9/v1"],
    "ray.stages": ["ray.stages.embed.num_cpus=0.5", "ray.stages.generation_plan.concurrency=2"],
}
OPENAI = ["engine.kind=openai", "engine.openai.base_url=http://127.0.0.1:9/v1"]
SURELY_SPEED = {
    "engine.batch_size",
    "engine.max_batch_tokens",
    "engine.vllm.gpu_memory_utilization",
    "engine.vllm.max_num_seqs",
    "storage.retries",
    "engine.dry_run_fail_marker",
    "engine.dry_run_tokens_per_s",
    "engine.call_timeout_s",
    "engine.max_restarts",
    "ray.engine_actors",
    "ray.engine_actor_gpus",
    "max_error_fraction",
    "ray.progress_bars",
}
SURELY_RESULTS = {
    "engine.model",
    "modes",
    "profile.max_new_tokens",
    "generation.candidates",
    "engine.vllm.structured_output",
    "ray.users_per_chunk",
    "ray.num_shards",
    "retrieval.top_k",
    "task",
    "input.questions",
}


def _another_value(base: list[str], key: str, field) -> list[str]:
    """``--set`` overrides that give ``key`` another valid value than in ``load_job(demo, base)``: the first of
    the field's other literals, a flipped boolean, a nearby number, a string, a list or a mapping that loads."""
    import json
    import typing

    if key in COMPANIONS:
        return COMPANIONS[key]
    before = _at(load_job(REPO / "jobs" / "demo.yaml", base).public_dict(), key)

    def literals(annotation) -> list:
        if typing.get_origin(annotation) is typing.Literal:
            return list(typing.get_args(annotation))
        return [x for arg in typing.get_args(annotation) for x in literals(arg)]

    tries = literals(field.annotation)
    if isinstance(before, bool):
        tries.append(not before)
    elif isinstance(before, (int, float)):
        tries += [before + 1, before / 2]
    tries += [1, 0.5, "x", ["x"], {"a": 1}]
    for value in tries:
        override = f"{key}={json.dumps(value)}"
        try:
            job = load_job(REPO / "jobs" / "demo.yaml", [*base, override])
        except ConfigError:
            continue
        if _at(job.public_dict(), key) != before:
            return [override]
    raise AssertionError(f"no other valid value found for {key}: give it companions")


def _at(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def test_resume_compares_only_keys_that_change_results(tmp_path):
    """Key by key over the whole spec: a run resumed with any key marked speed-only changed (a smaller batch after
    an out-of-memory crash, the fault switched off, a rotated credential) goes on; one with any other key changed
    (model, mode, prompt, profile, retrieval, chunking) is refused, naming the key. The ``openai`` engine's keys are
    compared where that engine runs."""
    import re

    from stepback_ray.config import JobSpec, speed_only_keys
    from stepback_ray.config.fields import walk_keys
    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline import check_resume
    from stepback_ray.storage import RunStore

    speed = set(speed_only_keys())
    assert SURELY_SPEED <= speed and not SURELY_RESULTS & speed  # the marking itself, on keys beyond doubt
    stores = {}
    for plain in (True, False):
        base = [f"output={tmp_path / str(plain)}", "run_id=r", *([] if plain else OPENAI)]
        job = load_job(REPO / "jobs" / "demo.yaml", base)
        stores[plain] = (base, RunStore(job.output_uri, job.storage))
        assert check_resume(stores[plain][1], job) is False
    tried = set()
    for key, field in walk_keys(JobSpec):
        base, store = stores[not key.startswith("engine.openai.")]
        overrides = _another_value(base, key, field)
        job = load_job(REPO / "jobs" / "demo.yaml", [*base, *overrides])
        tried.add(key)
        if key in speed:
            assert check_resume(store, job) is True, overrides
            continue
        with pytest.raises(StepbackError, match="changed: ") as refused:
            check_resume(store, job)
        named = re.search(r"changed: ([^)]*)\)", str(refused.value)).group(1).split(", ")
        assert any(k == key or k.startswith(f"{key}.") for k in named), (overrides, named)  # a mapping: its keys
    assert speed <= tried and len(tried) > 100


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


def test_every_engine_kind_names_the_class_that_implements_it():
    """``config.ENGINES`` is the one declaration of the engine kinds: ``engine.kind`` accepts exactly its keys, and
    each names a class that ``build_engine`` can import (without building it: no model is loaded here)."""
    import importlib
    import typing

    from stepback_ray.config import ENGINES, EngineConfig

    assert typing.get_args(EngineConfig.model_fields["kind"].annotation) == tuple(ENGINES)
    for kind, target in ENGINES.items():
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert callable(getattr(cls, "generate", None)) and callable(getattr(cls, "close", None)), kind
    with pytest.raises(ConfigError, match=r"engine.kind: Input should be 'transformers', 'vllm', 'dry-run' or"):
        load_job(None, data={**_minimal(), "engine": {"kind": "llama.cpp"}})


def test_a_run_recorded_with_a_key_since_removed_resumes(tmp_path):
    """A spec recorded before a setting was removed (``engine.decode_loop``) still holds it: the run resumes; a
    removed key never hides a change to a key that still exists."""
    import json

    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline import check_resume
    from stepback_ray.storage import RunStore

    base = [f"output={tmp_path / 'run'}", "run_id=r"]
    job = load_job(REPO / "jobs" / "demo.yaml", base)
    store = RunStore(job.output_uri, job.storage)
    check_resume(store, job)
    recorded = json.loads((tmp_path / "run" / "_run_spec.json").read_text())
    recorded["engine"].update(decode_loop="own", cpu_decode_kernels=True)
    (tmp_path / "run" / "_run_spec.json").write_text(json.dumps(recorded))
    assert check_resume(store, job) is True
    with pytest.raises(StepbackError, match=r"changed: generation.candidates\)"):
        check_resume(store, load_job(REPO / "jobs" / "demo.yaml", [*base, "generation.candidates=2"]))
