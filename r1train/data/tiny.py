"""The embedded tiny model: a Qwen2-architecture causal LM and a byte-level BPE tokenizer that the
project builds itself, offline and deterministically, so that every stage runs without a hub.

The folder written by `build_tiny_model` is an ordinary Hugging Face folder: `AutoTokenizer` and
`AutoModelForCausalLM.from_pretrained(path)` load it with `HF_HUB_OFFLINE=1`.

Tokenizer choices, and why:
- byte-level BPE, so any text (GSM8K questions, Chinese, emoji) encodes and decodes exactly;
- every digit is its own pre-token, as in Qwen2.5: arithmetic on a per-digit vocabulary is what
  a tiny model can learn;
- `<think>`, `</think>`, `<answer>`, `</answer>` are single added tokens (not "special", so
  `decode(skip_special_tokens=True)` keeps them and the rewards can see them);
- Qwen's special tokens and chat template: `<|im_start|>`, `<|im_end|>` (end of a turn, the EOS
  for generation), `<|endoftext|>` (padding).
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from pathlib import Path

import torch

from r1train.run.folder import give_new_file_modes

MARKER = "tiny_model.json"  # the build's settings and the files it wrote; written last
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen-style ChatML template: one block per message, then the assistant header when asked.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small on purpose: a CPU trains it in minutes. Tied embeddings as in Qwen2.5-0.5B.
TINY_MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text the BPE merges are learned from: the R1 prompt, R1-format arithmetic and some English."""
    from r1train.data.prompts import SYSTEM_PROMPT
    from r1train.data.task import TaskConfig, generate_problems

    rng = random.Random(seed)
    lines = [SYSTEM_PROMPT] * 50
    for p in generate_problems(TaskConfig(), 400, seed=seed, split="train"):
        lines.append(p["problem"])
        lines.append(p["completion"])
    words = ("the answer is first then next finally step so we add subtract multiply total "
             "how many what each of and a to in is are was were has have with for from").split()
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    lines += ["Step 1: Step 2: First, Second, Next, Finally, Summary:"] * 20
    return lines


# Sizes of the embedded model; "small" is the distillation student of the tiny pipeline.
TINY_SIZES = {
    "default": {},
    "small": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1),
}


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 512):
    """A `PreTrainedTokenizerFast` with Qwen's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tok.add_tokens(list(R1_TAGS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write tokenizer + randomly initialised Qwen2 model to `path`; same seed, same bytes."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(seed)
    # Round the embedding table up to a multiple of 64, as real checkpoints do.
    vocab = (len(tokenizer) + 63) // 64 * 64
    cfg = Qwen2Config(
        vocab_size=vocab,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_MODEL_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, do_sample=True, temperature=1.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    give_new_file_modes(path)  # model.safetensors comes 0600, its siblings 0644 (umask 022)
    # Written last, listing what was built: ensure_tiny_model replaces only a folder of these files.
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    (path / MARKER).write_text(json.dumps({"seed": seed, **TINY_MODEL_CONFIG, **overrides, "files": files}))
    return path


def _unlisted_file(path: Path) -> str | None:
    """The first file in `path` that its marker does not list as built by `build_tiny_model`."""
    try:
        listed = set(json.loads((path / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()  # no marker, or one written before markers listed their files
    return next((n for n in sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                 if n not in listed), None)


def remove_dead_builds(path: Path) -> list[Path]:
    """Remove the `<name>.tmp-<pid>` folders beside `path` whose process is gone: a build killed
    outright (SIGKILL, the machine lost) never ran its cleanup, and its folder was kept forever. A
    live process's folder may be a build under way and is kept (as is one whose pid was reused:
    it goes once that process ends). Pids are this machine's: the build runs on rank 0 only."""
    gone = []
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and tmp.is_dir() and not tmp.is_symlink() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            gone.append(tmp)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def ensure_tiny_model(path: str | os.PathLike, seed: int = 0, size: str = "default") -> Path:
    """Build the tiny model at `path` unless a complete one with the same seed is already there.

    Builds into a temporary sibling folder and renames it into place, so that two ranks or an
    interrupted build never leave a half-written model that the next run would load. A folder
    that must be replaced (another seed or size) is deleted only if every file in it is one its
    marker lists as built here: anything else there is the user's, and a ValueError names it.
    The temporary folders of builds whose process is gone are removed first (`remove_dead_builds`).
    """
    path = Path(path)
    marker = path / MARKER
    remove_dead_builds(path)
    if size not in TINY_SIZES:
        raise ValueError(f"embedded model size must be one of {sorted(TINY_SIZES)}, got {size!r}")
    want = {"seed": seed, **TINY_MODEL_CONFIG, **TINY_SIZES[size]}
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k != "files"} == want:
        return path
    if path.exists():
        name = _unlisted_file(path) if path.is_dir() else path.name
        if name is not None:
            raise ValueError(f"{path} holds {name}, which the embedded-model build did not write (or an "
                             f"older version built it); the build would replace the folder. Move it out "
                             f"of {path}, or use another --train.output_dir")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        build_tiny_model(tmp, seed=seed, **TINY_SIZES[size])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race with an identical build
        shutil.rmtree(tmp, ignore_errors=True)
    return path
