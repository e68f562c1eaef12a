"""Checkpoints: `torch.distributed.checkpoint` folders `step-N/`, resume, and Hugging Face export.

A checkpoint folder holds:
- the DCP shards of the model and optimizer (`get_state_dict`, so FSDP2 shards save in parallel
  and load back into any world size), and of any extra model the trainer passes, each under its
  own key (GRPO's reference model, once reference refreshes have moved it off the initial weights);
- `trainer_state.pt`: step, data position, scheduler state, the names of the extra models saved,
  anything small the trainer adds;
- `rng-rank{r}.pt`: each rank's Python / torch / CUDA RNG states;
- `config.yaml`: the resolved config that produced it.

Atomicity: everything is written into `step-N.tmp/`; after every rank has finished, rank 0
renames it to `step-N/`. A rename is atomic on POSIX filesystems, so a crash mid-save leaves only
a `.tmp` folder, which `latest()` never picks and the next save of that step replaces.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)

from infra.dist import DistInfo, barrier

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, info: DistInfo, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / ".metadata").exists() and (p / "trainer_state.pt").exists():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.root / f"step-{steps[-1]}" if steps else None

    def save(self, step: int, model, optimizer, trainer_state: dict, config_text: str = "",
             extra_models: dict[str, nn.Module] | None = None) -> Path:
        """Write `step-N/`. `extra_models` (name -> module, e.g. {"ref": ref_model}) are saved
        next to the model, without optimizer state, in the same collective `dcp.save`."""
        extra = extra_models or {}
        if {"model", "optim"} & extra.keys():
            raise ValueError(f"extra model names must not be 'model' or 'optim', got {sorted(extra)}")
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        extra_sd = {name: get_model_state_dict(m) for name, m in extra.items()}
        dcp.save({"model": model_sd, "optim": optim_sd, **extra_sd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.info.rank}.pt")
        if self.info.is_main:
            torch.save({"step": step, **trainer_state, "extra_models": sorted(extra)},
                       tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(config_text)
        barrier()
        if self.info.is_main:
            if final.exists():  # re-saving a step (e.g. after resuming from an older one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.steps()[:-self.keep_last]:
                shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)
        barrier()
        return final

    def load(self, path: str | os.PathLike, model, optimizer,
             extra_models: dict[str, nn.Module] | None = None) -> dict:
        """Restore model, optimizer and this rank's RNG; return the trainer state.

        Each of `extra_models` that the checkpoint holds is restored too; the others are left
        as they are. The returned state's `extra_models` lists the names the checkpoint holds,
        so the caller decides what a missing one means.
        """
        path = Path(path)
        if not (path / ".metadata").exists():
            raise ValueError(f"{path} is not a complete checkpoint (no .metadata)")
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        trainer_state.setdefault("extra_models", [])  # checkpoints written before extra models
        extra = {k: m for k, m in (extra_models or {}).items() if k in trainer_state["extra_models"]}
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd,
                 **{name: get_model_state_dict(m) for name, m in extra.items()}}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        for name, m in extra.items():
            set_model_state_dict(m, state[name])
        rng = path / f"rng-rank{self.info.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than saved: fresh RNG is fine
            _set_rng_state(torch.load(rng, weights_only=True))
        return trainer_state


def export_hf(model, hf_config, tokenizer, out_dir: str | os.PathLike, info: DistInfo,
              prefix: str = "") -> Path | None:
    """Gather the full weights and write a Hugging Face folder (safetensors + tokenizer).

    `prefix` is stripped from the state-dict keys (the trainer wraps the HF model). All ranks
    must call this (the gather is collective); rank 0 writes, into a temporary folder that is
    renamed into place, so a crash never leaves a half-written export.
    """
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    out = Path(out_dir)
    if info.is_main:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(hf_config)
        hf.load_state_dict(sd, assign=True, strict=False)
        if getattr(hf_config, "tie_word_embeddings", False):
            hf.tie_weights()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
    return out
