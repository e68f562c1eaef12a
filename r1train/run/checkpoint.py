"""Checkpoints: `torch.distributed.checkpoint` folders `step-N/`, resume, and Hugging Face export.

A checkpoint folder holds:
- the DCP shards of the model and optimizer (`get_state_dict`, so FSDP2 shards save in parallel
  and load back into any world size), and of any extra model the trainer passes, each under its
  own key (GRPO's reference model, once reference refreshes have moved it off the initial weights);
  with LoRA, of the adapters only (`is_lora_key`: A, B and GRPO's reference adapters) and their
  optimizer state: the frozen base is loaded from its path, as at the start;
- `trainer_state.pt`: step, data position, scheduler state, the names of the extra models saved,
  anything small the trainer adds; with LoRA, the base model's identity (`lora_base`: its path
  and the SHA-256 of its weights, model/load.py), which a resume checks before loading anything;
- `rng-rank{r}.pt`: each rank's Python / torch / CUDA RNG states;
- `config.yaml`: the resolved config that produced it;
- `manifest.json`: size and SHA-256 of every other file, written last.

Atomicity: everything is written into `step-N.tmp/`; after every rank has finished, each rank
hashes its share of the files, rank 0 writes the manifest and renames the folder to `step-N/`. A
rename is atomic on POSIX filesystems, so a crash mid-save leaves only a `.tmp` folder, which is
never resumed from and is removed at the next start (`run/folder.py`). Pruning renames a
folder to `step-N.deleting` before deleting it, so a prune cut short never leaves a half-deleted
`step-N/` behind.

Integrity and safety on resume (`resume_point`): the newest checkpoint is checked against its
manifest (sizes, then SHA-256, each rank a share of the files) before anything in it is read;
then its `.metadata` is unpickled with an allow-list of DCP's own types (`run/dcp_safe.py`), and
every other file is read with `weights_only=True`. A checkpoint that fails is reported by path on
stdout, renamed `step-N.damaged`, and the previous one is tried; when none is intact the run
refuses to start rather than silently begin again.

A save that fails (a full disk: ENOSPC) raises `CheckpointError` naming the cause and the path,
after removing its temporary folder; the previous checkpoint is untouched.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from r1train.run.config import ConfigError
from r1train.run.dcp_safe import one_process_quiet, read_metadata, safe_load
from r1train.run.dist import DistInfo, all_gather_objects, barrier, broadcast_object
from r1train.run.folder import (
    CHECKPOINT_FILE,
    MANIFEST,
    check_export_folder,
    file_digest,
    files_under,
    foreign_file,
    fsync_path,
    give_new_file_modes,
    manifest_problems,
    on_main,
    read_manifest,
    refuse_foreign,
    refuse_link,
    remove_scratch,
    write_manifest,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint or export could not be written; the message names the cause and the path."""


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


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), where torch's
    own file writer reports `unexpected pos 704 vs 598`."""
    with open(path, "wb") as f:
        torch.save(obj, f)



def describe_failure(exc: BaseException, where: Path) -> str:
    """One line for a failed write: an OSError found anywhere in the chain (DCP wraps each rank's
    in a CheckpointException) is named by its errno, e.g. 'No space left on device (ENOSPC)'."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            name = errno.errorcode.get(e.errno, str(e.errno))
            path = e.filename or where
            return f"{os.strerror(e.errno)} ({name}) writing {path}"
        failures = getattr(e, "failures", None) or {}
        todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (writing {where})"


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, info: DistInfo, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last
        self.last_saved: int | None = None
        """Step this process last saved or resumed from: its state is on disk already."""

    def _folders(self) -> dict[int, Path]:
        """step -> `step-N/` folder, complete or not; a link is none of them (run/folder.py: never
        resumed from, pruned or replaced; refused at start)."""
        if not self.root.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.root.iterdir()
                if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()}

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (the manifest is written last), oldest first."""
        return sorted(s for s, p in self._folders().items() if (p / MANIFEST).is_file())

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.root / f"step-{steps[-1]}" if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, trainer_state: dict, config_text: str = "",
             extra_models: dict[str, nn.Module] | None = None, lora_base: dict | None = None) -> Path:
        """Write `step-N/`. `extra_models` (name -> module, e.g. {"ref": ref_model}) are saved
        next to the model, without optimizer state, in the same collective `dcp.save`.
        `lora_base` (a LoRA run's base identity, `model.load.lora_base`): save the adapters
        alone, and the identity with them. Collective; on failure every rank raises
        CheckpointError and `step-N.tmp/` is gone."""
        from r1train.model.lora import is_lora_key

        extra = extra_models or {}
        if lora_base is not None:
            trainer_state = {**trainer_state, "model_keys": "adapters", "lora_base": lora_base}
        if {"model", "optim"} & extra.keys():
            raise ValueError(f"extra model names must not be 'model' or 'optim', got {sorted(extra)}")
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        on_main(self.info, lambda: self._fresh(tmp))
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            if lora_base is not None:
                model_sd = {k: v for k, v in model_sd.items() if is_lora_key(k)}
            extra_sd = {name: get_model_state_dict(m) for name, m in extra.items()}
            with one_process_quiet():  # one process: no collectives
                dcp.save({"model": model_sd, "optim": optim_sd, **extra_sd}, checkpoint_id=str(tmp),
                         no_dist=not dist.is_initialized())
            _torch_save(_rng_state(), tmp / f"rng-rank{self.info.rank}.pt")
            if self.info.is_main:
                _torch_save({"step": step, **trainer_state, "extra_models": sorted(extra)},
                            tmp / "trainer_state.pt")
                (tmp / "config.yaml").write_text(config_text)
            err = None
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException; shared below
            err = describe_failure(e, tmp)
        self._raise_if_any(all_gather_objects(err), final, tmp)  # also the barrier: every file is written
        # Each rank hashes (and fsyncs) a share of the files; rank 0 writes the manifest last.
        entries, err = {}, None
        try:
            names = files_under(tmp)[self.info.rank::self.info.world_size]
            for n in names:
                fsync_path(tmp / n)
                entries[n] = file_digest(tmp / n)
        except Exception as e:  # noqa: BLE001
            err = describe_failure(e, tmp)
        parts = all_gather_objects((err, entries))
        self._raise_if_any([e for e, _ in parts], final, tmp)

        def publish():
            if final.exists():  # re-saving a step (the last one, after its final evaluation)
                name = foreign_file(final, lambda n: CHECKPOINT_FILE.match(n) is not None)
                if name is not None:
                    raise refuse_foreign(final, name, "not a checkpoint file")
            try:
                write_manifest(tmp, {n: v for _, part in parts for n, v in part.items()})
                if final.exists():
                    self._delete(final)
                os.replace(tmp, final)
                fsync_path(self.root)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(self._failed(final, tmp, describe_failure(e, tmp))) from None
            self._prune()
        on_main(self.info, publish)
        barrier()
        self.last_saved = step
        return final

    def _fresh(self, tmp: Path) -> None:
        remove_scratch(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _failed(self, final: Path, tmp: Path, cause: str) -> str:
        prev = self.latest()
        kept = f"the newest complete checkpoint, {prev}, is untouched" if prev else "no earlier checkpoint exists"
        return (f"saving checkpoint {final} failed: {cause}; removed {tmp}, {kept}. Free space (or fix "
                f"the cause) and run the same command again to resume")

    def _raise_if_any(self, errors: list, final: Path, tmp: Path) -> None:
        errors = [e for e in errors if e]
        if not errors:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not stay full
        barrier()
        raise CheckpointError(self._failed(final, tmp, errors[0]))

    def _delete(self, folder: Path) -> None:
        """Delete a checkpoint folder: renamed first, so that an interrupted delete leaves a
        `.deleting` folder (removed at the next start), never a half-deleted `step-N/`."""
        if folder.is_symlink():  # a link made during the run: deleting it would reach elsewhere
            raise refuse_link(folder, "a checkpoint folder")
        gone = folder.with_name(folder.name + ".deleting")
        remove_scratch(gone, ignore_errors=True)
        os.replace(folder, gone)
        shutil.rmtree(gone)

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; delete older step folders that hold
        only the checkpointer's files."""
        kept = self.steps()[-self.keep_last:]
        for step, folder in sorted(self._folders().items()):
            if kept and step < kept[0]:
                name = foreign_file(folder, lambda n: CHECKPOINT_FILE.match(n) is not None)
                if name is not None:
                    print(f"[checkpoint] not pruning {folder}: it holds {name}, which this project "
                          f"did not write", flush=True)
                    continue
                self._delete(folder)

    # ------------------------------------------------------------------ resume
    def verify(self, path: Path) -> list[str]:
        """What is wrong with checkpoint `path`, one line per problem naming the file; [] when
        it is intact. Collective: each rank checks a share of the files against the manifest;
        only then does rank 0 unpickle the metadata and trainer state, with allow-lists."""
        rank, world = self.info.rank, self.info.world_size
        problems = []
        try:
            manifest = read_manifest(path)
            problems += manifest_problems(path, manifest, sorted(manifest)[rank::world])
            if rank == 0:
                problems += [f"{path / n} is not listed in the manifest" for n in files_under(path)
                             if n not in manifest and n != MANIFEST]
        except ValueError as e:
            problems += [str(e)] if rank == 0 else []
        problems = sorted({p for part in all_gather_objects(problems) for p in part})
        if not problems and rank == 0:
            for name, read in ((".metadata", read_metadata),
                               ("trainer_state.pt", lambda p: torch.load(p / "trainer_state.pt", weights_only=True))):
                try:
                    read(path)
                except Exception as e:  # noqa: BLE001 - a refusal is a finding, not a crash
                    problems.append(f"{path / name} cannot be read safely: {type(e).__name__}: {e}")
        return broadcast_object(problems)

    def resume_point(self) -> Path | None:
        """The newest intact checkpoint, or None when there is none at all. Collective.

        A damaged newer checkpoint is reported on stdout by path and renamed `step-N.damaged`
        (kept for inspection, out of the way of new saves and pruning). When every checkpoint is
        damaged, ConfigError: starting from scratch would silently discard the run."""
        rejected: list[tuple[Path, list[str]]] = []
        for step in sorted(self._folders(), reverse=True):
            path = self.root / f"step-{step}"
            problems = self.verify(path)
            if not problems:
                if rejected and self.info.is_main:
                    for bad, _ in rejected:
                        aside = bad.with_name(bad.name + ".damaged")
                        remove_scratch(aside, ignore_errors=True)
                        os.replace(bad, aside)
                        print(f"[checkpoint] WARNING: moved the damaged {bad} to {aside}", flush=True)
                    print(f"[checkpoint] WARNING: resuming from the previous complete checkpoint, "
                          f"{path}", flush=True)
                barrier()
                return path
            if self.info.is_main:
                print(f"[checkpoint] WARNING: checkpoint {path} is damaged, not resuming from it:\n  "
                      + "\n  ".join(problems), flush=True)
            rejected.append((path, problems))
        if rejected:
            bad, problems = rejected[0]
            raise ConfigError(f"no intact checkpoint in {self.root} to resume from ({bad}: {problems[0]}). "
                              f"Start over with --train.resume false (the run is moved to "
                              f"old-<date>-<time>/, not deleted)")
        return None

    def load(self, path: str | os.PathLike, model, optimizer,
             extra_models: dict[str, nn.Module] | None = None, lora_base: dict | None = None) -> dict:
        """Restore model, optimizer and this rank's RNG; return the trainer state.

        Each of `extra_models` that the checkpoint holds is restored too; the others are left
        as they are. The returned state's `extra_models` lists the names the checkpoint holds,
        so the caller decides what a missing one means. Nothing read can run code: see
        `run/dcp_safe.py`; `resume_point` verifies the files first.

        An adapter-only checkpoint restores the adapters onto the base the run loaded, once that
        base is shown to be the checkpoint's: `lora_base` (this run's) must have the SHA-256 it
        records (`check_lora_base`). A LoRA checkpoint of the whole model (written before
        adapter-only checkpoints) loads whole, base included, as it always did.
        """
        from r1train.model.lora import is_lora_key

        path = Path(path)
        if not (path / ".metadata").exists():
            raise ValueError(f"{path} is not a complete checkpoint (no .metadata)")
        try:  # refused here, by name, rather than deep inside dcp.load
            read_metadata(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path / '.metadata'} cannot be read safely: {type(e).__name__}: {e}") from None
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        trainer_state.setdefault("extra_models", [])  # checkpoints written before extra models
        extra = {k: m for k, m in (extra_models or {}).items() if k in trainer_state["extra_models"]}
        adapters_only = trainer_state.get("model_keys") == "adapters"
        if adapters_only:
            check_lora_base(path, trainer_state["lora_base"], lora_base)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if adapters_only:
            model_sd = {k: v for k, v in model_sd.items() if is_lora_key(k)}
        state = {"model": model_sd, "optim": optim_sd,
                 **{name: get_model_state_dict(m) for name, m in extra.items()}}
        safe_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not adapters_only))
        for name, m in extra.items():
            set_model_state_dict(m, state[name])
        rng = path / f"rng-rank{self.info.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than saved: fresh RNG is fine
            _set_rng_state(torch.load(rng, weights_only=True))
        self.last_saved = int(trainer_state["step"])
        return trainer_state


def check_lora_base(path: Path, saved: dict, now: dict | None) -> None:
    """Refuse to put a checkpoint's adapters on a base other than the one they were trained on:
    ConfigError naming both paths and both SHA-256s (every rank reads the same files, so every
    rank raises it)."""
    if now is None:
        raise ConfigError(f"{path} holds LoRA adapters only (trained on {saved['path']}), but this run has "
                          f"no adapters (--model.lora_rank 0)")
    if now["sha256"] != saved["sha256"]:
        raise ConfigError(f"{path} holds LoRA adapters trained on the base model {saved['path']} whose "
                          f"weights had SHA-256 {saved['sha256']}, but the base loaded now, {now['path']}, has "
                          f"SHA-256 {now['sha256']}: the base changed since the checkpoint was written. Put "
                          f"that base back, or start over with --train.resume false")


def export_hf(model, hf_config, tokenizer, out_dir: str | os.PathLike, info: DistInfo,
              prefix: str = "", config_text: str = "") -> Path | None:
    """Gather the full weights and write a Hugging Face folder (safetensors + tokenizer), with
    `config_text` (the training run's resolved options) as `training_config.yaml` beside them.

    `prefix` is stripped from the state-dict keys (the trainer wraps the HF model). All ranks
    must call this (the gather is collective); rank 0 writes, into a temporary folder that gets a
    `manifest.json` and is renamed into place, so a crash never leaves a half-written export. An
    existing export is replaced only if its manifest lists every file in it (ConfigError otherwise).
    A model with LoRA adapters is exported merged (W + scaling B A, base keys only: a plain model),
    then unmerged bit for bit.
    """
    from transformers import AutoModelForCausalLM

    from r1train.model.lora import has_lora, is_lora_key, merged, merged_weight_names

    with merged(model):  # LoRA: the export is the base weights with the adapters added in
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        if has_lora(model):
            # A CPU model's state dict holds its own tensors: the merged ones are copied before
            # unmerging puts the base weights back; the adapters (and GRPO's reference ones) are left out.
            keep = merged_weight_names(model)
            full = {k: v.clone() if k in keep else v for k, v in full.items() if not is_lora_key(k)}
    out = Path(out_dir)

    def write():
        check_export_folder(out)
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(hf_config)
        hf.load_state_dict(sd, assign=True, strict=False)
        if getattr(hf_config, "tie_word_embeddings", False):
            hf.tie_weights()

        def fill(tmp: Path) -> None:
            hf.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if config_text:
                (tmp / "training_config.yaml").write_text(config_text)
        publish_export(out, fill)
    on_main(info, write)
    barrier()
    return out


def export_adapter(model, hf_config, out_dir: str | os.PathLike, info: DistInfo, prefix: str = "",
                   tokenizer=None) -> Path:
    """Write the LoRA adapters of `model` alone in PEFT's format: `adapter_config.json` and
    `adapter_model.safetensors` (model/lora.py: `peft_adapter_config`, `lora_state_dict`), which
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base model. The project never
    imports PEFT; tests/test_lora_training.py checks the folder against it. With `tokenizer`, its
    files too (as PEFT trainers save them), so that a later stage given this folder as its
    --model.path (model/load.py) tokenizes as this run did, chat template included.

    `prefix` names the Hugging Face model inside `model` ("lm." for the trainer's wrapper), so that
    the keys are the causal LM's own paths. base_model_name_or_path is the path the run loaded
    (`hf_config.name_or_path`): a local folder made absolute, so the adapter finds its base from
    anywhere, a hub name as it is. Collective under FSDP2: every rank gathers each sharded A and B
    (the adapters only, never the base); rank 0 writes, atomically as `export_hf`."""
    from safetensors.torch import save_file

    from r1train.model.lora import lora_state_dict, peft_adapter_config

    lm = model.get_submodule(prefix.rstrip(".")) if prefix else model
    base = str(hf_config.name_or_path)
    if os.path.isdir(base):
        base = os.path.abspath(base)
    out = Path(out_dir)
    # full_tensor: a DTensor shard under FSDP2 (an all-gather, on every rank in the same order).
    # safetensors takes contiguous CPU tensors only; on CPU .to/.contiguous return the parameter's own.
    tensors = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).to("cpu").contiguous()
               for k, v in lora_state_dict(lm).items()}

    def fill(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_adapter_config(lm, base), indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    def write():
        check_export_folder(out)
        publish_export(out, fill)
    on_main(info, write)
    barrier()
    return out


def publish_export(out: Path, fill: Callable[[Path], None]) -> None:
    """Rank 0, after `check_export_folder(out)`: `fill(tmp)` writes the export into a temporary
    folder next to `out`, which gets a manifest and is renamed into place, so a crash never leaves
    a half-written export."""
    tmp = out.with_name(out.name + ".tmp")
    remove_scratch(tmp, ignore_errors=True)  # a link there would take the export elsewhere
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        give_new_file_modes(tmp)  # model.safetensors comes 0600, its siblings 0644 (umask 022)
        write_manifest(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001 - re-raised with its cause and path
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"exporting {out} failed: {describe_failure(e, tmp)}; removed {tmp}. "
                              f"The checkpoints are untouched: run the same command again") from e
