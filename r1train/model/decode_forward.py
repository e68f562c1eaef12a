"""A decode-only forward for the Llama / Qwen2 / Qwen3 family: one new token per row, over the
policy's own modules and weight tensors, against a static KV cache.

Hugging Face's forward serves every shape of call (prefill, training, any cache, any mask), and
a decode step pays for that generality on each token: a mask built from the cache, a cache
object per layer, `repeat_interleave` of grouped KV heads to the query heads, attention over the
whole padded cache. For one token per row the step is a short list of operations, and this is it:

    x = embed(token)                                            # [B, 1, d_model]
    for each layer:
        h = input_layernorm(x)
        q, k, v = q_proj(h), k_proj(h), v_proj(h)               # [B, H, 1, D], [B, H_kv, 1, D] x 2
        (Qwen3: q, k = q_norm(q), k_norm(k), per head)
        q, k = rope(q, position), rope(k, position)
        cache[layer][:, :, position] = k, v                     # in place, at one position
        o = attention(q, cache over each row's [start, position])   # kernels/decode_attention.py
        x = x + o_proj(o)
        x = x + down_proj(act(gate_proj(h2)) * up_proj(h2)),  h2 = post_attention_layernorm(x)
    logits = lm_head(norm(x))                                   # [B, V]

It reads the model's modules rather than copies of their weights: norms, projections, the MLP,
the rotary embedding and the LM head are called as they are, so a LoRA adapter
(`model/lora.py`, adapters on or off), CPU few-row linears and any RoPE scaling Hugging Face
implements act here as in the model's own forward. Only the attention is replaced: grouped KV
heads are read in place and only each row's live keys are read. The values are Hugging Face's:
tests/test_decode_forward.py compares the logits of several decode steps with the model's own
forward in float64. Fewer kernels per layer come from compiling this function
(model/static_decode.py), whose graph holds these operations and nothing else: inductor fuses
the elementwise work between the matrix products (residual add + RMSNorm, SiLU-mul, RoPE, the
cache write). The q/k/v and gate/up products stay three and two: merging them would copy the
weights (or change the model's layout), and on a GPU a decode step reads the weights once
either way.

`unsupported(lm)` names what this forward does not do (sliding-window layers, other model
families); the static decoder then runs Hugging Face's forward instead.
"""
from __future__ import annotations

import torch
from torch import nn

from r1train.kernels.decode_attention import decode_attention

FAMILIES = ("llama", "qwen2", "qwen3")


def unsupported(lm: nn.Module) -> str | None:
    """Why `DecodeForward` cannot run `lm` (None: it can)."""
    kind = getattr(lm.config, "model_type", None)
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one of {', '.join(FAMILIES)}"
    decoder = lm.get_decoder()
    for i, layer in enumerate(decoder.layers):
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            return f"layer {i} uses sliding-window attention"
    if getattr(lm.config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021) in Hugging Face's half-split layout: x [B, heads, 1, D], cos / sin
    [B, 1, 1, D]."""
    return x * cos + _rotate_half(x) * sin


class DecodeForward:
    """`lm`'s decode step as the module docstring writes it. `__call__` takes the step's tokens
    [B, 1] and positions [B, 1] (RoPE's position of each row's new token), the cache `layers`
    (one per decoder layer, with `.keys` / `.values` [B, H_kv, C, D]), `write_at` [1] (the cache
    column of the new token, the same for every row) and `start` [B] (each row's first live
    column); a row attends to columns [start, write_at]. Returns [B, V] logits in the model's dtype."""

    def __init__(self, lm: nn.Module):
        reason = unsupported(lm)
        if reason is not None:
            raise ValueError(f"DecodeForward: {reason}")
        self.lm = lm
        self.decoder = lm.get_decoder()
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layers, write_at: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        dec = self.decoder
        x = dec.embed_tokens(input_ids)  # [B, 1, d_model]
        cos, sin = dec.rotary_emb(x, position_ids)  # [B, 1, D] each
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]: broadcast over heads
        end = (write_at + 1).expand(b)  # [B]
        for layer, cache in zip(dec.layers, layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, self.heads, self.head_dim)  # [B, 1, H, D]
            k = attn.k_proj(h).view(b, 1, self.kv_heads, self.head_dim)  # [B, 1, H_kv, D]
            v = attn.v_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, 1, D]
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = _rope(q.transpose(1, 2), cos, sin)  # [B, H, 1, D]
            k = _rope(k.transpose(1, 2), cos, sin)  # [B, H_kv, 1, D]
            cache.keys.index_copy_(2, write_at, k)
            cache.values.index_copy_(2, write_at, v)
            o = decode_attention(q[:, :, 0], cache.keys, cache.values, start, end, attn.scaling)  # [B, H, D]
            x = x + attn.o_proj(o.reshape(b, 1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = dec.norm(x)
        return self.lm.get_output_embeddings()(x[:, -1])  # [B, V]
