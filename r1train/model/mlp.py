"""SwiGLU's product without autograd's copy of silu(g): one [tokens, intermediate] tensor less per
layer kept for backward.

The MLP of Llama, Qwen2, Qwen3 and Mistral (SwiGLU, Shazeer 2020, "GLU Variants Improve
Transformer", Eq. 6 with Swish_1 = SiLU):

    MLP(x) = W_down (silu(g) * u),      g = W_gate x,  u = W_up x,  silu(g) = g sigmoid(g)

Written as Hugging Face writes it, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, autograd keeps
g (for silu's backward), silu(g) and u (for the product's), and W_down keeps the product itself:
four intermediate-sized tensors a token per layer. `silu_mul` computes the same values but keeps
only g and u; its backward recomputes silu(g):

    d/du = grad * silu(g)
    d/dg = grad * u * s (1 + g (1 - s)),   s = sigmoid(g)     (d silu / dg = s + g s (1 - s))

with the operators autograd runs for the plain expression (`aten::silu_backward` for the second),
so forward and gradients are the plain expression's bit for bit, for one more silu a layer in
backward (668 x 1536 floats on one CPU thread, with the trainer's 1 MiB mmap threshold: forward
and backward 11.8 ms against 9.9 ms, 0.1 s of a SmolLM2 GRPO update of 11-12 s). On SmolLM2-135M
(intermediate 1536) it keeps 117 MiB less for a GRPO micro-batch of 668 tokens, 12% of what its
30 layers keep (bench/RESULTS.md, issue 29). Without gradients (generation, reference passes) it
is the plain expression.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# The MLPs whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))` in transformers.
SWIGLU_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u  # [..., I]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        # Autograd's own steps for silu(g) * u, silu(g) recomputed: the same values bit for bit.
        d_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None  # [..., I]
        d_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        return d_g, d_u


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, saving g and u only for backward (module docstring)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return _SiluMul.apply(g, u)
    return F.silu(g) * u


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    """`act` computes F.silu: checked on a few values, so that a subclass that computes something
    else (or an activation that became another one in a later transformers) is left alone."""
    t = torch.linspace(-6, 6, 13, dtype=torch.float64)
    try:
        return torch.equal(act(t), F.silu(t))
    except Exception:
        return False


def fuse_swiglu(lm: nn.Module) -> int:
    """Give every SwiGLU MLP of `lm` (SWIGLU_MLPS, act_fn a SiLU) the forward that computes the
    product with `silu_mul`; returns how many. The modules, their weights and the state dict are
    unchanged; other MLPs keep their own forward."""
    mlps = [m for m in lm.modules() if type(m).__name__ in SWIGLU_MLPS
            and all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and _is_silu(m.act_fn)]
    for m in mlps:
        m.forward = types.MethodType(_swiglu_forward, m)
    return len(mlps)
