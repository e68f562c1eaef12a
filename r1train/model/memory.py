"""How much memory a run will need, worked out at start from its options and its model's shape.

Some options multiply memory: `--rollout.group_size 100000` asks the engine for a KV cache of
hundreds of gigabytes, and the process used to be killed by the kernel (or CUDA) minutes later
with no word on which option did it. The stages now estimate their peak before they generate,
print it in one line, and refuse (ConfigError, naming the options to lower) when it exceeds the
memory the device has free (`check_memory`).

The estimate follows what the code allocates, per rank:

- weights: every parameter at its dtype (float32 by default; one more copy for GRPO's reference
  model when beta > 0). Under FSDP each rank holds 1/world of them, and generation gathers the
  whole policy (`run.dist.set_gathered`) in the compute dtype.
- AdamW: two moments per trainable parameter, in the parameter's dtype; gradients one more
  copy, during the update only (the loop frees them after each optimizer step).
- generation (model/engine.py): the KV cache is `PreallocatedLayer` buffers of
  [rows, kv_heads, prompt + new tokens, head_dim] for the keys and the values of every layer,
  in the compute dtype (bfloat16 under CUDA autocast, the weights' dtype on a CPU), where rows =
  the prompts generated together x group_size. Each decode step also holds the rows' [rows,
  vocab] float32 logits and the sampler's float64 copies of them (`sample_tokens`: two at once),
  24 bytes per row and vocabulary entry; and each row carries int64 ids, masks and float64
  uniforms, 24 bytes per position.
- update: log-probs go through the fused kernel (kernels/logprobs.py), which never holds a
  micro-batch's [tokens, vocab] logits, only its live tiles (16 MiB on a CPU, 2 GiB on CUDA). What
  grows with the micro-batch is the activations autograd keeps for backward, per token and
  layer: 12 hidden-sized vectors (each norm's input, scaled input and output, the queries before
  and after rotation, the keys and values repeated to every query head, the attention output,
  the residual), 3 MLP-sized (gate, up, their product: SiLU's output is recomputed in backward,
  model/mlp.py) and 4 the size of the
  keys and values (k and v, k rotated, the rotation's half-turn). With gradient checkpointing,
  one layer's worth plus 4 hidden-sized vectors per layer: the layer's input, and what was
  measured besides it (SmolLM2-135M shapes, torch 2.13, transformers 5.25: 450-540 kB a token
  where the input alone is 69 kB).
- the step's batch: int64 ids and masks and float32 log-probs, ~40 bytes per row and position.

Generation and the update do not overlap (the cache is freed before the update starts), so the
peak is weights + optimizer + batch + the larger of the two. Not counted: the Python process
itself (torch and transformers, ~0.5 GB, already mapped when free memory is read), the prefill
of the distinct prompts (a few rows), and allocator slack. On the embedded tiny model and on
SmolLM2-135M the estimate came within 2x of the measured peak (tests/test_memory.py).
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field

import torch

from r1train.kernels.logprobs import TORCH_CHUNK_BUDGET_BYTES, TORCH_CHUNK_BUDGET_BYTES_CUDA
from r1train.run.config import ConfigError

# Bytes per (row, vocabulary entry) while a decode step samples: the float32 logits, and two
# float64 [rows, vocab] tensors of sample_tokens alive at once (scaled logits / probabilities /
# their cumulative sum), plus the model's own float32 output.
SAMPLING_BYTES = 4 + 8 + 8 + 4
# Bytes per (row, position) of the engine's row bookkeeping: int64 mask and output ids, float64
# per-row uniforms.
ROW_BYTES = 24
# Bytes per (row, position) of a GRPO step's batch: int64 ids, mask, completion ids and mask,
# float32 reference / old log-probs.
BATCH_BYTES = 40
# The fused log-prob kernel's working tile: the chunked path's budget (on CUDA the Triton kernels
# hold less).
TILE_BYTES_CPU, TILE_BYTES_CUDA = TORCH_CHUNK_BUDGET_BYTES, TORCH_CHUNK_BUDGET_BYTES_CUDA


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model: sizes from its Hugging Face config, and the
    parameter count and bytes per parameter of the loaded weights."""
    params: int
    param_bytes: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    trainable: int | None = None
    """Parameters that train (LoRA: the adapters'); None: all of them. AdamW and the gradients
    are counted for these only."""

    @classmethod
    def of(cls, lm: torch.nn.Module) -> "ModelShape":
        """The shape of a loaded Hugging Face causal LM (parameter counts of DTensors are global)."""
        c = lm.config.get_text_config(decoder=True)
        heads = c.num_attention_heads
        p = next(lm.parameters())
        return cls(params=sum(q.numel() for q in lm.parameters()), param_bytes=p.element_size(),
                   trainable=sum(q.numel() for q in lm.parameters() if q.requires_grad),
                   layers=c.num_hidden_layers, hidden=c.hidden_size,
                   intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size)


@dataclass
class MemoryEstimate:
    """Bytes per rank, by part (module docstring). `held`: what is already allocated when the
    estimate is checked (the loaded weights), so that it is compared with memory free then."""
    weights: float = 0.0
    reference: float = 0.0
    optimizer: float = 0.0
    batch: float = 0.0
    generation: dict[str, float] = field(default_factory=dict)
    update: dict[str, float] = field(default_factory=dict)
    held: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.reference + self.optimizer + self.batch
                + max(sum(self.generation.values()), sum(self.update.values()), 0.0))

    def describe(self) -> str:
        """One line: each part, then the total."""
        def parts(items):
            return " + ".join(f"{k} {size(v)}" for k, v in items)
        fixed = [(k, getattr(self, k)) for k in ("weights", "reference", "optimizer", "batch") if getattr(self, k)]
        phases = [f"{name} ({parts(d.items())})" for name, d in (("generation", self.generation),
                                                                 ("update", self.update)) if d]
        peak = f" + the larger of {' or '.join(phases)}" if len(phases) > 1 else \
            (f" + {phases[0]}" if phases else "")
        return f"{parts(fixed)}{peak} = {size(self.total)}"


def size(n: float) -> str:
    """Bytes as GB, MB or kB, three digits or so."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 100 * scale else 0}f} {unit}"
    return f"{n / 1e3:.0f} kB"


def estimate_memory(shape: ModelShape, *, gen_rows: int, prompt_tokens: int, new_tokens: int,
                    compute_bytes: int, reference: bool = False, train: bool = True, step_rows: int = 0,
                    micro_tokens: int = 0, gradient_checkpointing: bool = False, world_size: int = 1,
                    sharded: bool = False, tile_bytes: int = TILE_BYTES_CPU) -> MemoryEstimate:
    """The peak bytes of one rank (module docstring), a pure function of sizes.

    `gen_rows`: rows generated at once (prompts per generation x group_size); `prompt_tokens`:
    the longest prompt; `new_tokens`: max_new_tokens; `compute_bytes`: bytes per element of the
    KV cache and activations; `reference`: a second, frozen copy of the weights; `train`: add
    gradients, AdamW and the update; `step_rows`: rows of a step's batch; `micro_tokens`: tokens
    of one training micro-batch; `sharded`: FSDP over `world_size` ranks."""
    s, share = shape, (world_size if sharded else 1)
    weight_bytes = s.params * s.param_bytes
    est = MemoryEstimate(weights=weight_bytes / share, reference=weight_bytes / share if reference else 0.0)
    positions = prompt_tokens + new_tokens
    kv_per_position = 2 * s.layers * s.kv_heads * s.head_dim * compute_bytes  # keys and values
    est.generation = {"KV cache": gen_rows * positions * (kv_per_position + ROW_BYTES),
                      "sampling": gen_rows * s.vocab * SAMPLING_BYTES}
    if sharded:
        est.generation["gathered weights"] = s.params * compute_bytes
    if train:
        trained_bytes = (s.params if s.trainable is None else s.trainable) * s.param_bytes
        est.optimizer = 2 * trained_bytes / share
        est.batch = step_rows * positions * BATCH_BYTES
        per_token_layer = (12 * s.hidden + 3 * s.intermediate + 4 * s.kv_heads * s.head_dim) * compute_bytes
        kept = (4 * s.layers * s.hidden * compute_bytes + per_token_layer) if gradient_checkpointing \
            else s.layers * per_token_layer
        est.update = {"gradients": trained_bytes / share, "activations": micro_tokens * kept,
                      "log-prob tile": float(min(tile_bytes, micro_tokens * s.vocab * 8))}
    return est


def compute_bytes(device: torch.device, param_bytes: int, bf16: bool) -> int:
    """Bytes per element of the KV cache and activations: bfloat16 where the run computes in it
    (`bf16`: CUDA autocast, or FSDP's mixed precision on CUDA), never for a float64 model; else
    the weights' own."""
    return 2 if bf16 and device.type == "cuda" and param_bytes != 8 else param_bytes


def packed_micro_tokens(micro_rows: int, group_size: int, prompt_tokens: int, new_tokens: int,
                        micro_batch_tokens: int = 0, packing: bool = True) -> int:
    """Tokens of the largest GRPO micro-batch: a token budget (a completion longer than it gets a
    micro-batch of its own), else micro_rows completions, and packed the prompts of the groups
    they touch once each (at most one more than whole groups would give), padded every row's."""
    if micro_batch_tokens:
        return max(micro_batch_tokens, prompt_tokens + new_tokens)
    if not packing:
        return micro_rows * (prompt_tokens + new_tokens)
    prompts = min(micro_rows, math.ceil(micro_rows / group_size) + 1)
    return micro_rows * new_tokens + prompts * prompt_tokens


def available_memory(device: torch.device) -> float | None:
    """Bytes free for this process now: CUDA's free memory on `device`, or the host's
    MemAvailable on a CPU; None when unknown (the check is then skipped)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return None
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def check_memory(est: MemoryEstimate, available: float | None, tag: str, advice: dict[str, str],
                 processes: int = 1, say=None) -> None:
    """Refuse (ConfigError) when the estimate exceeds the memory free now plus what the run holds
    already (`est.held`); else print it once through `say`. `processes`: ranks sharing this
    memory (every rank of a CPU run on one host). `advice`: what to lower when "generation",
    "update" or the "weights" (with optimizer and batch) is the largest part; the refusal names
    the largest part's."""
    need = est.total * processes
    have = None if available is None else available + est.held * processes
    share = f" for each of {processes} processes" if processes > 1 else ""
    if have is not None and need > have:
        sizes = {"generation": sum(est.generation.values()), "update": sum(est.update.values()),
                 "weights": est.weights + est.reference + est.optimizer + est.batch}
        largest = max((k for k in sizes if k in advice), key=sizes.get)
        raise ConfigError(f"[{tag}] these settings need about {size(need)} of memory and {size(have)} is "
                          f"available: {est.describe()}{share}. The {largest} "
                          f"is the largest part: {advice[largest]}")
    if say is not None:
        free = f"; {size(have)} available" if have is not None else "; free memory unknown, not checked"
        say(f"[{tag}] memory estimate per process: {est.describe()}{free}")


def local_processes(device: torch.device, world_size: int) -> int:
    """Ranks of this run that share one memory: every local rank on a CPU host, one per GPU."""
    if device.type == "cuda":
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


M_MMAP_THRESHOLD = -3  # mallopt's parameter number for the mmap threshold (glibc's malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc takes on a 64-bit machine (DEFAULT_MMAP_THRESHOLD_MAX)


def set_mmap_threshold(threshold: int) -> bool:
    """CPU runs (train.malloc_mmap_threshold): have glibc give each buffer of `threshold` bytes or
    more its own mapping, unmapped when freed, so that what generation and the update free goes
    back to the system at once (mallopt M_MMAP_THRESHOLD).

    glibc's default threshold slides: after a mapped buffer is freed, buffers up to its size (up
    to 32 MiB) come from the heap, and the heap keeps what they leave behind when it cannot
    reuse it. Measured on a LoRA GRPO step of SmolLM2-135M (bench/RESULTS.md): 3.36 GiB peak RSS
    with the sliding threshold, 2.13 GiB at 1 MiB, when 2.16 GiB was in use at the peak. The
    price is a mapping and page faults per large buffer.

    Returns whether the threshold was set: not with `threshold` 0 (glibc's own), where the
    environment sets MALLOC_MMAP_THRESHOLD_ (the user's choice, read by glibc at start), and not
    where the C library has no such setting (musl, macOS)."""
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
