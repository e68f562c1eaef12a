"""Loading models and tokenizers (local folder, hub name, GGUF file, or the embedded tiny model),
shared by every stage; the optimizer and its schedule are run/optim.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from r1train.model.mlp import fuse_swiglu
from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo, barrier

EMBEDDED = "embedded"


def resolve_model_path(path: str, output_dir: str | os.PathLike, info: DistInfo, seed: int = 0,
                       size: str = "default") -> str:
    """'embedded' -> build (once, on rank 0) the tiny model under <output_dir>/tiny-model;
    a .gguf file or a packaged model's name -> its converted, cached folder (model/gguf.py).

    A `tiny-model/` holding files the build did not write is never replaced: ConfigError naming
    the file, raised on every rank (the others would otherwise wait for rank 0 forever)."""
    from r1train.model.gguf import is_gguf_source, resolve_gguf

    if is_gguf_source(path):
        return resolve_gguf(path, info)
    if path != EMBEDDED:
        return path
    from r1train.data.tiny import ensure_tiny_model
    from r1train.run.config import ConfigError
    from r1train.run.folder import on_main

    target = Path(output_dir) / "tiny-model"

    def build():
        try:
            ensure_tiny_model(target, seed=seed, size=size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    on_main(info, build)
    barrier()
    return str(target)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = "",
                   system_role: str = "auto", option: str = "--model."):
    """The tokenizer at `path`, left-padding, with a pad token. `chat_template`: a Jinja file that
    replaces its template. `system_role` (a template without a system role, e.g. Gemma's):
    "auto" merges system text into the first user turn then (data.prompts.merge_system_turn),
    "merge" always does, "error" refuses such a template. `option`: what the two options'
    names follow in error messages (`--distill.teacher_` for a distillation teacher)."""
    from transformers import AutoTokenizer

    from r1train.data.prompts import MERGE_SYSTEM, template_has_system_role

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}. Pass a local folder "
                          f"(or a hub name with network access / a warm cache).") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    if chat_template:
        try:
            tok.chat_template = Path(chat_template).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{option}chat_template={chat_template!r}: cannot read it: {e}") from None
        if not tok.chat_template.strip():  # would read as "no template" below, blaming the tokenizer
            raise ConfigError(f"{option}chat_template={chat_template!r}: the file is empty; it must hold a "
                              f"Jinja chat template")
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"tokenizer at {path!r} has no chat template; the R1 prompt needs one "
                          f"(give one with {option}chat_template template.jinja)")
    merge = system_role == "merge" or not template_has_system_role(tok)
    if merge:
        setattr(tok, MERGE_SYSTEM, True)
    # Before the system-role verdict: a template that does not compile has no system role either.
    check_chat_template(tok, f"{option}chat_template={chat_template!r}" if chat_template else
                        f"the chat template of the tokenizer at {path!r} (give another with {option}chat_template)")
    if merge and system_role == "error":
        raise ConfigError(f"{option}system_role=error: the chat template of {chat_template or path!r} has "
                          f"no system role (it refuses or drops a system turn); use {option}system_role "
                          f"auto to merge the system prompt into the first user turn, or "
                          f"--data.system_prompt ''")
    return tok


def check_chat_template(tok, origin: str) -> None:
    """Render a sample system + user prompt the way the data's prompts are rendered
    (`render_prompt`, with the generation prompt): a template that is not valid Jinja, raises, or
    renders nothing fails here, naming `origin`, before any weights load. Otherwise it fails at
    the first prompt, after the model loaded; an empty prompt even later, in generation, as "cannot
    reshape tensor of 0 elements"."""
    from jinja2 import TemplateSyntaxError

    from r1train.data.prompts import make_conversation, render_prompt

    sample = make_conversation("What is 2 + 3?", "You are a helpful assistant.")
    try:
        text = render_prompt(tok, sample, add_generation_prompt=True)
    except TemplateSyntaxError as e:
        raise ConfigError(f"{origin}: not a valid Jinja template: {e.message} (line {e.lineno})") from None
    except Exception as e:  # noqa: BLE001 - raise_exception, an undefined name, ...: all the template's
        raise ConfigError(f"{origin}: rendering a sample system + user prompt raised "
                          f"{type(e).__name__}: {e}") from None
    if not text.strip():
        raise ConfigError(f"{origin}: renders an empty prompt for a sample system + user conversation "
                          f"(add_generation_prompt=True); the template must write the messages and the "
                          f"assistant header")


def load_causal_lm(path: str, *, dtype: str = "auto", device: torch.device,
                   trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Weights in float32 unless bfloat16 or float64 is asked for: FSDP2 / autocast compute in
    bf16 on CUDA while the optimizer keeps float32 master weights; float64 computes in float64.
    SwiGLU MLPs get `fuse_swiglu`'s forward (the same values, one tensor less kept for backward)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(dtype, torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, use_safetensors=None)
    except OSError as e:
        raise ConfigError(f"cannot load a model from {path!r}: {e}") from None
    fuse_swiglu(model)  # the same forward, one activation fewer kept for backward (model/mlp.py)
    return model.to(device)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_folder(path: str, option: str = "--model.") -> dict | None:
    """The `adapter_config.json` of a LoRA adapter folder in PEFT's format (what
    --train.export_adapter writes as final-adapter/, or PEFT's `save_pretrained`); None when
    `path` is not one. What this project cannot apply as PEFT would is refused, naming the field."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        return None
    where = f"{option}path={path!r}"
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read its {ADAPTER_CONFIG}: {e}") from None
    problems = [f"peft_type {config.get('peft_type')!r} (LORA only)" if config.get("peft_type") != "LORA" else "",
                "no base_model_name_or_path" if not config.get("base_model_name_or_path") else "",
                f"target_modules {config.get('target_modules')!r} (a list of names only)"
                if not isinstance(config.get("target_modules"), list) else "",
                "use_dora" if config.get("use_dora") else "",
                f"bias {config.get('bias')!r} (none only)" if config.get("bias", "none") != "none" else "",
                "modules_to_save" if config.get("modules_to_save") else "",
                f"no {ADAPTER_WEIGHTS}" if not (folder / ADAPTER_WEIGHTS).is_file() else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"{where}: an adapter folder this project cannot apply: {'; '.join(problems)}")
    return config


def load_model(m, output_dir: str | os.PathLike, info: DistInfo, *, trainable: bool = True,
               option: str = "--model."):
    """A `ModelConfig` -> (resolved path, tokenizer, causal LM on the device). `option`: as
    load_tokenizer's. A trainable model gets the LoRA adapters of `m.lora_rank` > 0 (its base
    weights frozen); a frozen one (a reference, a sampler, a teacher) never does.

    `m.path` may be a LoRA adapter folder (`read_adapter_folder`, e.g. an earlier stage's
    final-adapter/): its base (`base_model_name_or_path`) loads, then the adapter goes on it
    (`apply_adapter_folder`): trained on as it is (unmerged) by a stage with `m.lora_rank` > 0,
    whose LoRA options must be the adapter's; merged into the weights otherwise (every weight
    trains, or the model is frozen). The tokenizer is the folder's when it holds one, else the base's."""
    from transformers.utils import logging as hf_logging

    # transformers' own bars ("Loading weights", "Writing model shards") would tear the
    # trainer's progress bar and fill logs; the trainer says what it loads and saves.
    hf_logging.disable_progress_bar()
    path = resolve_model_path(m.path, output_dir, info, seed=m.seed, size=m.embedded_size)
    adapter = read_adapter_folder(path, option)
    weights = adapter["base_model_name_or_path"] if adapter else path
    own_tokenizer = adapter is None or (Path(path) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(m.tokenizer or (path if own_tokenizer else weights), m.trust_remote_code,
                               m.chat_template, m.system_role, option)
    lm = load_causal_lm(weights, dtype=m.dtype, device=info.device, trust_remote_code=m.trust_remote_code,
                        attn_implementation=m.attn_implementation)
    if not m.keep_dropout:
        disable_dropout(lm)
    if adapter:
        apply_adapter_folder(lm, path, adapter, m if trainable and m.lora_rank else None, option)
    if not trainable:
        lm.requires_grad_(False)
        return path, tokenizer, lm
    if adapter and not m.lora_rank:
        lm.requires_grad_(True)  # merged: every weight trains, as from any model
    if m.lora_rank and not adapter:
        add_lora(lm, m, option)
    if m.gradient_checkpointing:
        # Non-reentrant: the checkpoint PyTorch recommends, and the one FSDP2 supports; the
        # reentrant kind also needs an input that requires grad to pass gradients through.
        # transformers 5.2x renamed the method (the old name warns); older releases have only it.
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return path, tokenizer, lm


def add_lora(lm: torch.nn.Module, m, option: str = "--model.") -> None:
    """Adapters on the layers `m.lora_targets` names (model/lora.py); a name that matches no
    linear layer is refused here, after the load (only the model knows its layers' names)."""
    from r1train.model.lora import apply_lora
    from r1train.run.sections import lora_targets

    try:
        apply_lora(lm, m.lora_rank, m.lora_alpha, lora_targets(m), m.lora_dropout, m.lora_rslora)
    except ValueError as e:
        raise ConfigError(f"{option}lora_targets={m.lora_targets!r}: {e}") from None


def apply_adapter_folder(lm: torch.nn.Module, path: str, adapter: dict, m=None, option: str = "--model.") -> None:
    """The adapter at `path` (config `adapter`) onto its base `lm`. `m`: the ModelConfig of a
    stage that trains the adapter on: its lora_rank, lora_alpha, lora_rslora and the layers its
    lora_targets wrap must be the adapter's (ConfigError naming the option and both values);
    its lora_dropout applies. None: the adapter is merged into the weights (`merge_and_unload`)."""
    from safetensors.torch import load_file

    from r1train.model.lora import apply_lora, load_lora_state_dict, merge_and_unload

    rank, alpha, rslora = adapter.get("r"), adapter.get("lora_alpha"), bool(adapter.get("use_rslora", False))
    where = f"{option}path={path!r}"
    if m is not None:
        for name, mine, theirs in (("lora_rank", m.lora_rank, rank), ("lora_alpha", m.lora_alpha, alpha),
                                   ("lora_rslora", m.lora_rslora, rslora)):
            if mine != theirs:
                raise ConfigError(f"{option}{name}={mine!r}: the adapter this stage trains on ({path}) has "
                                  f"{name} {theirs!r}; use its value, or {option}lora_rank 0 to train every "
                                  f"weight of the model with the adapter merged in")
        add_lora(lm, m, option)
    else:
        try:
            apply_lora(lm, rank, alpha, adapter["target_modules"], 0.0, rslora)
        except ValueError as e:
            raise ConfigError(f"{where}: its adapter_config.json: {e}") from None
    try:
        load_lora_state_dict(lm, load_file(str(Path(path) / ADAPTER_WEIGHTS), device=str(next(lm.parameters()).device)))
    except ValueError as e:
        hint = f" (compare {option}lora_targets with its target_modules {adapter['target_modules']})" if m else ""
        raise ConfigError(f"{where}: {e}{hint}") from None
    if m is None:
        merge_and_unload(lm)


def lora_base(path: str, lm: torch.nn.Module, info: DistInfo) -> dict | None:
    """With LoRA adapters on `lm`: the identity of the base model they train on, which every
    checkpoint records and a resume checks (run/checkpoint.py): the path it was loaded from (a
    folder made absolute; an adapter folder's base_model_name_or_path) and `base_sha256` of its
    weights, computed on rank 0 and sent to all. None without adapters. Call it before sharding:
    it reads the whole model."""
    from r1train.model.lora import base_sha256, has_lora
    from r1train.run.dist import broadcast_object

    if not has_lora(lm):
        return None
    adapter = read_adapter_folder(path)
    path = adapter["base_model_name_or_path"] if adapter else path
    digest = broadcast_object(base_sha256(lm) if info.is_main else None)
    return {"path": os.path.abspath(path) if os.path.isdir(path) else path, "sha256": digest}


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of `model`: nn.Dropout modules and the float rates that attention
    modules keep as attributes (Qwen2's and Llama's `attention_dropout`). The config is left
    alone, so an exported model keeps the rates it came with."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def eos_token_ids(tokenizer, lm) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config
    (Qwen2.5-Instruct lists both <|im_end|> and <|endoftext|> there)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    return sorted(i for i in ids if isinstance(i, int))
