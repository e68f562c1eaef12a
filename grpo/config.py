"""GRPO job configuration: typed dataclasses with a documented default per field.

Defaults target a real model (Qwen2.5-0.5B-Instruct class) and follow the literature rather than
the tutorial: learning rate 1e-6 (DeepSeekMath used 1e-6; the tutorial's 5e-5 destroys a
pretrained model within a few hundred steps), beta 0.04, group size 8, clip 0.2. The embedded
recipe (`configs/tiny-r1.yaml`, and what `train.py` runs with no arguments) sets its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from data.task import TaskConfig
from rewards import REWARD_NAMES, RewardConfig
from infra.config import ConfigError
from infra.dist import FSDP_MODES

EMBEDDED = "embedded"


@dataclass
class ModelConfig:
    path: str = EMBEDDED
    """Local Hugging Face folder or hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct); 'embedded' builds
    the project's tiny Qwen2 model and tokenizer under <output_dir>/tiny-model."""
    tokenizer: str = ""
    """Tokenizer folder or name when it differs from `path`."""
    dtype: str = "auto"
    """Weights dtype: auto (float32 on CPU; on CUDA float32 master weights with bf16 compute),
    float32 or bfloat16."""
    trust_remote_code: bool = False
    """Run the model repo's own Python code. Off by default: only for repos you trust."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained: sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (real models on small GPUs)."""
    keep_dropout: bool = False
    """Keep the model's dropout in training. Off by default: with dropout the policy differs
    from the reference and from itself between forwards, so the KL and the ratio are noise even
    on identical weights."""
    seed: int = 0
    """Seed of the embedded model's weights and tokenizer."""
    embedded_size: str = "default"
    """Size of the embedded model: default (~0.85M parameters) or small (the distillation student)."""


@dataclass
class DataConfig:
    source: str = EMBEDDED
    """'embedded' (the synthetic arithmetic task), a local .jsonl/.json/.parquet file or folder,
    or a Hugging Face dataset name (e.g. AI-MO/NuminaMath-TIR)."""
    schema: str = "auto"
    """Column layout: auto, numina, gsm8k, math or bespoke."""
    train_split: str = "train"
    """Split used for training prompts."""
    eval_source: str = ""
    """Held-out problems (same kinds of value as `source`). Empty or equal to `source`: the part
    of `source` training does not read: its test split, or for a single file / unsplit folder the
    test side of the seeded split (`test_size`, train.seed). Another source: its test split if it
    names one, else all of its rows (a file that is a test set). See data.loaders.load_held_out."""
    eval_split: str = "auto"
    """Split of the held-out problems: auto (the rule of `eval_source`) or a split name."""
    test_size: float = 0.1
    """Held-out fraction of a `source` with no test split, cut by seed; the held-out problems
    are exactly that cut when `eval_source` is empty or `source`."""
    num_train: int = 2000
    """Training problems to generate for the embedded task (ignored for files)."""
    num_eval: int = 200
    """Held-out problems evaluated (first N of the eval split)."""
    on_bad_row: str = "error"
    """What a malformed row does: error (stop, naming file/row/field) or skip (count it)."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are dropped with a count (they would crowd out completions)."""
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt; advantages are relative within a group."""
    max_new_tokens: int = 512
    """Completion budget in tokens; longer completions are cut and flagged truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra strings that end a completion (EOS always does)."""
    prompts_per_generation: int = 0
    """Prompts generated together in one batch per rank (0 = all of the rank's prompts)."""
    eval_temperature: float = 0.0
    """Temperature of evaluation decoding (0 = greedy)."""


@dataclass
class GRPOConfig:
    prompts_per_step: int = 16
    """Prompts per optimizer step, over all ranks (global batch = prompts_per_step * group_size)."""
    micro_batch_size: int = 8
    """Completions per forward/backward on one rank (gradient accumulation over the rest)."""
    num_iterations: int = 1
    """mu: passes over each batch of rollouts; > 1 needs old-policy log-probs and clipping."""
    beta: float = 0.04
    """KL coefficient against the frozen reference model (0 = no reference model)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (DeepSeekMath Eq. 4)."""
    epsilon_low: float = 0.2
    """Lower clip range: ratio >= 1 - epsilon_low."""
    epsilon_high: float = 0.0
    """Upper clip range (DAPO clip-higher); 0 = same as epsilon_low."""
    loss_type: str = "grpo"
    """grpo, bnpo, dr_grpo or dapo (see grpo/loss.py)."""
    importance_sampling: str = "token"
    """token (GRPO) or sequence (GSPO)."""
    advantage_estimator: str = "grpo"
    """grpo (group mean/std) or rloo (leave-one-out)."""
    scale_rewards: str = "group"
    """group, batch or none (Dr. GRPO): what the centred rewards are divided by."""
    mask_truncated: bool = False
    """Exclude completions that hit max_new_tokens from the loss (DAPO)."""
    drop_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal out of the loss (DAPO dynamic sampling, lite)."""
    ref_refresh_steps: int = 0
    """tau: every tau steps mix the policy into the reference (0 = never)."""
    ref_mix_alpha: float = 0.6
    """alpha: reference <- alpha * policy + (1 - alpha) * reference at each refresh."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions, by name (see rewards)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (empty = all 1.0)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to lr."""
    schedule: str = "constant"
    """After warm-up: constant or cosine (to min_lr_ratio * lr at max_steps)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule, as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 = off)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/grpo"
    """Checkpoints, metrics.jsonl, samples and the exported model go here."""
    max_steps: int = 500
    """Optimizer steps."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    device: str = "auto"
    """auto, cpu or cuda."""
    fsdp: str = "auto"
    """auto: shard with FSDP2 when torchrun starts more than one process; always: also a single
    process (a process group of one; FSDP2's bf16 mixed precision instead of autocast on CUDA),
    which runs the multi-GPU code path on one device."""
    eval_every: int = 50
    """Evaluate on held-out problems every N steps (0 = only at start and end)."""
    save_every: int = 50
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir."""
    log_every: int = 1
    """Print a metrics line every N steps."""
    sample_every: int = 10
    """Write sample completions with their rewards every N steps (0 = never)."""
    max_nonfinite: int = 3
    """Stop after this many consecutive non-finite losses/gradients (each skips its update)."""
    export: bool = True
    """Export the final model as a Hugging Face folder <output_dir>/final."""
    wandb: bool = False
    """Mirror metrics to Weights & Biases (offline mode without an API key)."""
    wandb_project: str = "r1-from-scratch"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    stop_at_step: int = 0
    """Stop after this step as if SIGTERM had arrived (checkpoint, clean exit); for testing
    preemption and resume. 0 = off."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective before the run fails: a frozen (not dead) rank is
    detected in minutes. Raise it when rank 0 alone writes a very large export (~100 GB at
    200 MB/s takes 8 minutes while the others wait). A pipeline's process group keeps the default."""


@dataclass
class GRPOJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the option, on values and combinations that cannot train.

        Runs in `parse_args`, before any model or data loads. Bounds are written as
        `not (x > 0)` where a NaN must fail too (`nan <= 0` is False)."""
        r, g, o, t = self.rollout, self.grpo, self.optim, self.train
        check_model(self.model)
        check_data(self.data)
        check_optim(o)
        check_train(t)
        if r.group_size < 2:
            bad("rollout.group_size", r.group_size, "must be >= 2 (advantages compare completions within a group)")
        if g.prompts_per_step < 1:
            bad("grpo.prompts_per_step", g.prompts_per_step, "must be >= 1")
        if g.prompts_per_step % world_size:
            bad("grpo.prompts_per_step", g.prompts_per_step,
                f"must be divisible by the world size {world_size} (each rank scores whole groups)")
        local = g.prompts_per_step // world_size * r.group_size
        if g.micro_batch_size < 1 or local % g.micro_batch_size:
            bad("grpo.micro_batch_size", g.micro_batch_size,
                f"must divide the per-rank batch of {local} completions "
                f"(prompts_per_step / world_size * group_size)")
        if r.prompts_per_generation < 0:
            bad("rollout.prompts_per_generation", r.prompts_per_generation, "must be >= 0")
        if r.max_new_tokens < 1:
            bad("rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
        if not (finite(r.temperature) and r.temperature > 0):
            bad("rollout.temperature", r.temperature, "must be a finite number > 0 for GRPO sampling")
        if not 0 < r.top_p <= 1:
            bad("rollout.top_p", r.top_p, "must be in (0, 1]")
        if r.top_k < 0:
            bad("rollout.top_k", r.top_k, "must be >= 0 (0 = off)")
        if not (finite(r.eval_temperature) and r.eval_temperature >= 0):
            bad("rollout.eval_temperature", r.eval_temperature, "must be a finite number >= 0 (0 = greedy)")
        if not (finite(g.beta) and g.beta >= 0):
            bad("grpo.beta", g.beta, "must be a finite number >= 0")
        if g.num_iterations < 1:
            bad("grpo.num_iterations", g.num_iterations, "must be >= 1")
        for option, value in (("grpo.epsilon_low", g.epsilon_low), ("grpo.epsilon_high", g.epsilon_high)):
            if not (finite(value) and value >= 0):
                bad(option, value, "must be a finite number >= 0")
        for opt, val, allowed in (("grpo.loss_type", g.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo")),
                                  ("grpo.kl_estimator", g.kl_estimator, ("k1", "k2", "k3")),
                                  ("grpo.importance_sampling", g.importance_sampling, ("token", "sequence")),
                                  ("grpo.advantage_estimator", g.advantage_estimator, ("grpo", "rloo")),
                                  ("grpo.scale_rewards", g.scale_rewards, ("group", "batch", "none"))):
            one_of(opt, val, allowed)
        if not g.rewards:
            bad("grpo.rewards", g.rewards, "needs at least one reward function")
        unknown = [n for n in g.rewards if n not in REWARD_NAMES]
        if unknown:
            bad("grpo.rewards", unknown, f"unknown reward; valid names: {', '.join(REWARD_NAMES)}")
        if len(set(g.rewards)) != len(g.rewards):
            bad("grpo.rewards", g.rewards, "names a reward twice")
        if g.reward_weights and len(g.reward_weights) != len(g.rewards):
            bad("grpo.reward_weights", g.reward_weights, f"needs one weight per reward ({len(g.rewards)})")
        if not all(finite(w) for w in g.reward_weights):
            bad("grpo.reward_weights", g.reward_weights, "must be finite numbers")
        if not 0 <= g.ref_mix_alpha <= 1:
            bad("grpo.ref_mix_alpha", g.ref_mix_alpha, "must be in [0, 1]")
        if g.ref_refresh_steps < 0:
            bad("grpo.ref_refresh_steps", g.ref_refresh_steps, "must be >= 0 (0 = never)")
        if g.ref_refresh_steps and g.beta == 0:
            bad("grpo.ref_refresh_steps", g.ref_refresh_steps, "needs beta > 0 (no reference model otherwise)")
        try:
            self.rewards.check()
        except ValueError as e:
            raise ConfigError(f"--rewards.{e}") from None
        if t.max_steps < 1:
            bad("train.max_steps", t.max_steps, "must be >= 1")


# ---- checks shared by every command's config (grpo, sft, rejection-sample, distill) ----------

def bad(option: str, value, why: str):
    raise ConfigError(f"--{option}={value!r}: {why}")


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(option: str, value, allowed) -> None:
    if value not in allowed:
        bad(option, value, f"must be one of {', '.join(allowed)}")


def check_model(m: ModelConfig, section: str = "model") -> None:
    from data.tiny import TINY_SIZES

    if not m.path.strip():
        bad(f"{section}.path", m.path, "must name a model folder, a hub name or 'embedded'")
    one_of(f"{section}.dtype", m.dtype, ("auto", "float32", "bfloat16"))
    one_of(f"{section}.embedded_size", m.embedded_size, tuple(TINY_SIZES))


def check_data(d, section: str = "data") -> None:
    """The fields of a DataConfig or SFTDataConfig that loading would refuse later."""
    from data.loaders import SCHEMAS

    if not d.source.strip():
        bad(f"{section}.source", d.source, "must name a file, a folder, a hub dataset or 'embedded'")
    one_of(f"{section}.schema", d.schema, ("auto", *SCHEMAS))
    one_of(f"{section}.on_bad_row", d.on_bad_row, ("error", "skip"))
    for name in ("train_split", "split", "eval_split"):
        if hasattr(d, name) and not getattr(d, name).strip():
            bad(f"{section}.{name}", getattr(d, name), "must name a split, e.g. train, test or all")
    if not 0 < d.test_size < 1:
        bad(f"{section}.test_size", d.test_size, "must be a fraction in (0, 1)")
    if d.num_train < 1:
        bad(f"{section}.num_train", d.num_train, "must be >= 1")
    if d.num_eval < 0:
        bad(f"{section}.num_eval", d.num_eval, "must be >= 0")
    if hasattr(d, "max_prompt_tokens") and d.max_prompt_tokens < 1:
        bad(f"{section}.max_prompt_tokens", d.max_prompt_tokens, "must be >= 1")
    try:  # TaskConfig checks itself when built; options set its fields one by one after that
        TaskConfig(**dataclasses.asdict(d.task))
    except ValueError as e:
        raise ConfigError(f"--{section}.{e}") from None


def check_optim(o: OptimConfig, section: str = "optim") -> None:
    if not (finite(o.lr) and o.lr > 0):
        bad(f"{section}.lr", o.lr, "must be a finite number > 0")
    if not (finite(o.weight_decay) and o.weight_decay >= 0):
        bad(f"{section}.weight_decay", o.weight_decay, "must be a finite number >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            bad(f"{section}.{name}", getattr(o, name), "must be in [0, 1)")
    if o.warmup_steps < 0:
        bad(f"{section}.warmup_steps", o.warmup_steps, "must be >= 0")
    one_of(f"{section}.schedule", o.schedule, ("constant", "cosine"))
    if not 0 <= o.min_lr_ratio <= 1:
        bad(f"{section}.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if not (finite(o.max_grad_norm) and o.max_grad_norm >= 0):
        bad(f"{section}.max_grad_norm", o.max_grad_norm, "must be a finite number >= 0 (0 = off)")


def check_train(t: TrainConfig, section: str = "train") -> None:
    """Everything but max_steps (SFT may derive it from --sft.epochs)."""
    if not t.output_dir.strip():
        bad(f"{section}.output_dir", t.output_dir, "must name a folder")
    one_of(f"{section}.device", t.device, ("auto", "cpu", "cuda"))
    if t.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            bad(f"{section}.device", t.device, "CUDA is not available here (torch.cuda.is_available() "
                                               "is False); use auto or cpu")
    one_of(f"{section}.fsdp", t.fsdp, FSDP_MODES)
    for name, least, note in (("eval_every", 0, " (0 = only at start and end)"),
                              ("save_every", 0, " (0 = only at the end)"), ("keep_last", 1, ""),
                              ("log_every", 1, ""), ("sample_every", 0, " (0 = never)"),
                              ("max_nonfinite", 1, ""), ("stop_at_step", 0, " (0 = off)")):
        if getattr(t, name) < least:
            bad(f"{section}.{name}", getattr(t, name), f"must be >= {least}{note}")
