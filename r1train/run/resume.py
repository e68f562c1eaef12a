"""What a resumed run does with options that differ from its checkpoint's: apply them or refuse.

A checkpoint restores state (weights, optimizer moments and hyperparameters, the scheduler's
base learning rates, the data position); options that the trainer reads afresh every step
(rollout, grpo, rewards, clipping, the schedule's shape, cadences) take effect by themselves.
Without this module the two kinds mix silently: `--optim.lr 5e-5` on a resume printed the new
value and trained at the checkpoint's. Here every difference is classified and said:

- **run identity** (`IDENTITY`): the model, the data and the seed define what the checkpoint is
  a point of; changing them would splice two experiments into one run folder. Refused, naming
  each option with both values, with the way to start over.
- **restored, re-applied** (`OPTIMIZER`): learning rate, betas, weight decay are written back
  into the optimizer and the scheduler after loading, so the new values take effect at once.
- everything else is read from the config every step: applied from the resumed step on.

Both lists are said on rank 0 at resume. The checkpoint's config is the `config.yaml` it holds.
"""
from __future__ import annotations

from pathlib import Path

from r1train.run.config import ConfigError, load_recipe, to_dict

# Prefixes (section or section.field) whose change makes a resume a different run.
IDENTITY = ("model.path", "model.tokenizer", "model.seed", "model.embedded_size",
            "model.trust_remote_code", "data.source", "data.schema", "data.train_split",
            "data.split", "data.test_size", "data.num_train", "data.task.", "data.mix_source",
            "data.mix_fraction", "data.max_prompt_tokens", "data.on_bad_row", "data.columns",
            "data.system_prompt", "data.response_prefix", "model.chat_template", "model.system_role",
            "problems.",
            "model.lora_rank", "model.lora_alpha", "model.lora_targets", "model.lora_rslora",
            "train.seed", "sft.max_seq_len", "sft.packing", "sft.assistant_only", "sft.overflow",
            "distill.teacher")
# Options the checkpoint restores (optimizer param groups, scheduler base_lrs): re-applied.
OPTIMIZER = ("optim.lr", "optim.beta1", "optim.beta2", "optim.weight_decay")
# Where a run's output goes and how it is driven: never a reason to refuse, not worth a line.
QUIET = ("train.output_dir", "train.resume", "train.progress", "train.stop_at_step")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config as `section.field` options."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def config_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """[(option, checkpoint's value, current value)] for every option that differs."""
    old, new = flatten(saved), flatten(now)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not _matches(k, QUIET)]


def check_resume(checkpoint: str | Path, cfg, tag: str) -> list[str]:
    """Refuse identity changes since `checkpoint`; return the lines that say what else changed.

    Lists compare as lists (a recipe's tuple and the YAML's list are the same option)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{checkpoint}: no config.yaml, so the options it was trained with are "
                          f"unknown; start over with --train.resume false")
    saved = load_recipe(path)
    # An option added since the checkpoint was written (absent from its config) at its default
    # is no change: the run then goes on as it was (data.columns, data.system_prompt, ...).
    defaults, known = flatten(_plain(to_dict(type(cfg)()))), flatten(saved)
    changes = [c for c in config_changes(saved, _plain(to_dict(cfg)))
               if c[0] in known or c[2] != defaults.get(c[0])]
    refused = [c for c in changes if _matches(c[0], IDENTITY)]
    if refused:
        listed = "; ".join(f"--{k} was {a!r}, now {b!r}" for k, a, b in refused)
        raise ConfigError(f"resuming {checkpoint}: {listed}. These define the run, so its "
                          f"checkpoint cannot continue under them: go back to the checkpoint's "
                          f"values, or start a new run with --train.resume false or another "
                          f"--train.output_dir")
    return [f"[{tag}] since {Path(checkpoint).name}: --{k} {a!r} -> {b!r} "
            f"({'re-applied to the restored optimizer' if _matches(k, OPTIMIZER) else 'applies from here on'})"
            for k, a, b in changes]


def _plain(d):
    """Tuples as lists, as YAML gives them back."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def apply_optimizer_options(optimizer, scheduler, o) -> None:
    """Write lr, betas and weight decay of the current config `o` into a restored optimizer and
    LambdaLR scheduler (param group 0 decays, group 1 does not: `run.optim.build_optimizer`).
    The learning rate of the next step is set at once, from the scheduler's multiplier."""
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    lrs = []
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = o.lr
        group["betas"] = (o.beta1, o.beta2)
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0
        group["lr"] = o.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs
