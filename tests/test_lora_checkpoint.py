"""Adapter-only checkpoints (run/checkpoint.py with `lora_base`), in one process on the tiny model:
the base's identity is the SHA-256 of its weights in the documented order (checked against a
transcription that reads the safetensors file, not the model), a checkpoint holds A, B and their
AdamW moments only and restores them bit for bit onto the same base, a changed base is refused
naming both paths and both hashes, and a LoRA checkpoint of the whole model (the format before)
still loads whole."""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1train.model.load import lora_base
from r1train.model.lora import apply_lora, base_sha256, lora_parameters
from r1train.run.checkpoint import CheckpointManager
from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _lora_model(path, seed):
    """The tiny model with rank-4 adapters, B random (as if trained), and AdamW over them after one step."""
    torch.manual_seed(seed)
    model = _load(path)
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.1)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_base_sha256_is_the_documented_hash_of_the_weights(tiny):
    # The transcription: SHA-256 over the base tensors in sorted key order, each as
    # "key|dtype|shape\n" then its bytes, read from the file (the tied head is the embedding).
    tensors = load_file(Path(tiny) / "model.safetensors")
    tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    model = _load(tiny)
    assert base_sha256(model) == h.hexdigest()
    apply_lora(model, rank=4, alpha=8.0)  # the adapters are not the base
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(1.0)
    assert base_sha256(model) == h.hexdigest()
    with torch.no_grad():  # one element of the base one float32 step away: another base
        w = model.model.layers[1].mlp.up_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1e9))
    assert base_sha256(model) != h.hexdigest()
    assert base_sha256(_load(tiny, torch.float64)) != h.hexdigest()  # the dtype as loaded is part of it


def test_adapter_only_checkpoint_restores_adapters_and_moments_onto_the_same_base(tiny, tmp_path):
    trained, opt = _lora_model(tiny, seed=1)
    base = lora_base(tiny, trained, INFO)
    assert base == {"path": str(Path(tiny).resolve()), "sha256": base_sha256(_load(tiny))}
    saved = CheckpointManager(tmp_path / "adapters", INFO).save(3, trained, opt, {"x": 1}, lora_base=base)
    whole = CheckpointManager(tmp_path / "whole", INFO).save(3, trained, opt, {"x": 1})
    # 38,912 adapter parameters and two moments each, against 854,144 parameters and the same moments
    assert _size(saved) < 0.25 * _size(whole), (_size(saved), _size(whole))

    fresh, fresh_opt = _lora_model(tiny, seed=2)  # other adapters, other moments, the same base
    state = CheckpointManager(tmp_path / "adapters", INFO).load(saved, fresh, fresh_opt,
                                                                  lora_base=lora_base(tiny, fresh, INFO))
    assert state["step"] == 3 and state["x"] == 1 and state["lora_base"] == base
    want, got = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    for p, q in zip(lora_parameters(trained), lora_parameters(fresh)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_opt.state[q][key], opt.state[p][key])


def test_a_changed_base_is_refused_naming_both_paths_and_hashes(tiny, tmp_path):
    trained, opt = _lora_model(tiny, seed=1)
    base = lora_base(tiny, trained, INFO)
    saved = CheckpointManager(tmp_path / "ckpt", INFO).save(1, trained, opt, {}, lora_base=base)
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    fresh, fresh_opt = _lora_model(other, seed=2)
    now = lora_base(str(other), fresh, INFO)
    with pytest.raises(ConfigError) as e:
        CheckpointManager(tmp_path / "ckpt", INFO).load(saved, fresh, fresh_opt, lora_base=now)
    msg = str(e.value)
    assert base["sha256"] in msg and now["sha256"] in msg and base["sha256"] != now["sha256"]
    assert str(Path(tiny).resolve()) in msg and str(other) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="no adapters"):
        CheckpointManager(tmp_path / "ckpt", INFO).load(saved, fresh, fresh_opt, lora_base=None)


def test_a_whole_model_lora_checkpoint_of_before_still_loads_whole(tiny, tmp_path):
    trained, opt = _lora_model(tiny, seed=1)
    saved = CheckpointManager(tmp_path / "old", INFO).save(2, trained, opt, {})  # no lora_base: the old format
    fresh, fresh_opt = _lora_model(tiny, seed=2)
    with torch.no_grad():
        fresh.model.norm.weight.add_(1.0)  # the whole-model checkpoint puts the base back too
    state = CheckpointManager(tmp_path / "old", INFO).load(saved, fresh, fresh_opt,
                                                            lora_base=lora_base(tiny, fresh, INFO))
    assert "lora_base" not in state
    want, got = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
