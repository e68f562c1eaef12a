"""SwiGLU's product without autograd's copy of silu(g): one [tokens, intermediate] tensor less per
layer kept for backward.

The MLP of Llama, Qwen2, Qwen3 and Mistral (SwiGLU, Shazeer 2020, "GLU Variants Improve
Transformer", Eq. 6 with Swish_1 = SiLU):

    MLP(x) = W_down (silu(g) * u),      g = W_gate x,  u = W_up x,  silu(g) = g sigmoid(g)

Written as Hugging Face writes it, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, autograd keeps
g (for silu's backward), silu(g) and u (for the product's), and W_down keeps the product itself:
four intermediate-sized tensors a token per layer. `silu_mul` computes the same values but keeps
only g and u; its backward recomputes s = sigmoid(g):

    d/du = grad * silu(g)
    d/dg = grad * u * s (1 + g (1 - s))         (d silu / dg = s + g s (1 - s))

The forward is the same operations in the same order as Hugging Face's (bit for bit); the
backward rounds in another order than `silu_backward` (within float rounding; computed in float32
at least, so 16-bit inputs round once at the end). On SmolLM2-135M (intermediate 1536) that is
117 MiB less for a GRPO micro-batch of 668 tokens, 12% of what its 30 layers keep
(bench/RESULTS.md, issue 29). Without gradients (generation, reference passes) it is the plain
expression.
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
        acc = torch.promote_types(g.dtype, torch.float32)
        g32, grad32 = g.to(acc), grad.to(acc)
        s = torch.sigmoid(g32)  # [..., I]
        d_u = (grad32 * g32 * s).to(u.dtype) if ctx.needs_input_grad[1] else None
        d_g = None
        if ctx.needs_input_grad[0]:
            d_g = (grad32 * u.to(acc) * s * (1 + g32 * (1 - s))).to(g.dtype)
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
            and all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    mlps = [m for m in mlps if _is_silu(m.act_fn)]
    for m in mlps:
        m.forward = types.MethodType(_swiglu_forward, m)
    return len(mlps)
