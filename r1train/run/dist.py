"""Distributed setup in one place: read the torchrun environment, pick the device, shard models.

The same scripts run as `python train.py ...` (one process, no process group) and as
`torchrun --nproc_per_node=N [--nnodes=M ...] train.py ...`. The model code knows nothing about
FSDP: `shard_model` applies FSDP2's `fully_shard` to each decoder layer, then to the root.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    fsdp: bool = False
    """Models are sharded with FSDP2 over a process group; always so when world_size > 1."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up and models are FSDP2-sharded (one process too, if asked)."""
        return self.world_size > 1 or self.fsdp


FSDP_MODES = ("auto", "always")


DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
"""How long a rank waits in a collective for the others before failing. Long enough for the
longest legitimate one-sided wait (rank 0 alone writes an export or builds the tiny model while
the others wait: ~100 GB at 200 MB/s is ~8 minutes); short enough that a frozen rank costs minutes,
not the 30 minutes of torch's default for gloo."""


def init_distributed(device: str = "auto", fsdp: str = "auto",
                     timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Initialise the process group when launched by torchrun; return rank, world size, device.

    `device`: "auto" (CUDA when available, else CPU), "cpu" or "cuda". CPU runs use gloo, CUDA
    runs use NCCL with one GPU per local rank.
    `fsdp`: "auto" shards with FSDP2 when there is more than one process; "always" also shards a
    single process, over a process group of one: the multi-GPU code path (NCCL, FSDP2's bf16
    mixed precision instead of autocast) on one GPU.
    `timeout_s`: collective timeout of the process group (`--train.collective_timeout_s`); a no-op
    when the group exists already (a pipeline creates it once, for all of its stages).
    """
    if fsdp not in FSDP_MODES:
        raise ValueError(f"fsdp must be one of {', '.join(FSDP_MODES)}, got {fsdp!r}")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    shard = world_size > 1 or fsdp == "always"
    if shard and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        rendezvous = {}
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # plain `python`, no torchrun: a group of one needs no rendezvous, just a store
            rendezvous = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **rendezvous, **({"device_id": dev} if device == "cuda" else {}))
    return DistInfo(rank, world_size, local_rank, dev, fsdp=shard)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int, device) -> int:
    """The largest `value` over ranks; `value` itself in a single process."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all ranks), concatenated along dim 0 in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (`[obj]` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_ragged(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `t`, of any length, concatenated in rank order (padded to the longest for
    the collective, the padding cut off after)."""
    if not dist.is_initialized():
        return t
    lengths = all_gather_cat(torch.tensor([t.numel()], device=t.device)).tolist()
    padded = torch.zeros(max(lengths), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = all_gather_cat(padded[None])  # [R, longest]
    return torch.cat([row[:n] for row, n in zip(parts, lengths)])


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen2, Llama, Mistral, GPT-2 style)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return list(mod)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; "
                     "expected model.layers or transformer.h")


def shard_model(root: nn.Module, layers: list[nn.Module], info: DistInfo, *,
                reshard_after_forward: bool = True, bf16: bool | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (which holds embeddings and head).

    On CUDA, parameters compute in bf16 and gradients reduce in float32 (float64 models: all in
    float64); on CPU (gloo) all is in the parameters' dtype. Gradients are *summed* over ranks,
    not averaged: every loss of this project divides by the count of the whole optimizer step
    (tokens or sequences, all micro-batches, all ranks),
    so the sum is the global mean and nothing needs undoing (torchtitan's
    `set_gradient_divide_factor`). The root's named forwards (`FORWARD_METHODS`, e.g.
    `PolicyModel.completion_logprobs`) gather its parameters as `forward` would. Without a
    process group the model is returned unchanged.
    """
    if not info.distributed:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if bf16 is None:  # a float64 model is asked for to compute in float64
        bf16 = info.device.type == "cuda" and next(root.parameters()).dtype != torch.float64
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for module in (*layers, root):
        fully_shard(module, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        module.set_gradient_divide_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # a plain SUM: gloo has no PREMUL_SUM
            module.set_force_sum_reduction_for_comms(True)
    for name in getattr(root, "FORWARD_METHODS", ()):
        register_fsdp_forward_method(root, name)
    return root


def set_gathered(model: nn.Module, gathered: bool) -> None:
    """Keep FSDP2 parameters unsharded between forwards (for token-by-token generation) or not.

    Generation calls the model once per token; resharding after each call would all-gather every
    layer once per token. While `gathered`, the first forward gathers and later ones reuse.
    """
    if not hasattr(model, "set_reshard_after_forward"):
        return
    model.set_reshard_after_forward(not gathered)
    if not gathered:
        model.reshard()
        for m in model.modules():
            if m is not model and hasattr(m, "reshard"):
                m.reshard()
