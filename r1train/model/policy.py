"""The policy: a Hugging Face causal LM with the three forwards the stages need, named.

    next_token_logits    generation: the logits of each row's last position, with a KV cache
    completion_logprobs  GRPO: log pi(y_t | q, y_<t) of completion tokens (and their entropy)
    packed_logprobs      GRPO on packed rows: the same, each prompt computed once for its group
    label_logprobs       SFT: log p of every label token of (packed) rows (distillation: + logits)

The last two go through the fused log-prob kernel (`kernels/`), so no [tokens, vocab] logits are
materialised. `PolicyModel` is the FSDP root: `run.dist.shard_model` registers each named
forward with FSDP2, so that calling one gathers the root's parameters (embeddings, final norm,
LM head) as a call of `forward` would. The model knows nothing else about FSDP.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from r1train.kernels import fused_linear_logprobs
from r1train.model.attention import VARLEN_ATTENTION, attention_implementation


class PolicyModel(nn.Module):
    FORWARD_METHODS = ("next_token_logits", "completion_logprobs", "packed_logprobs", "label_logprobs")

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self._cache_arg = cache_argument(lm)

    def forward(self, *args, **kwargs):
        raise TypeError(f"PolicyModel has named forwards: {', '.join(self.FORWARD_METHODS)}")

    def _hidden(self, input_ids, attention_mask, position_ids, **attention) -> torch.Tensor:
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **attention).last_hidden_state

    def next_token_logits(self, input_ids, attention_mask, position_ids, cache=None):
        """([B, V] float32 logits of each row's last position, the updated KV cache)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1].float().clone(), out[self._cache_arg]  # clone: FSDP2 dislikes views

    def completion_logprobs(self, input_ids, attention_mask, position_ids, targets, target_start: int,
                            temperature: float = 1.0, return_entropy: bool = False):
        """[B, T] log-probs of `targets` (and [B, T] entropies): completion token t sits at
        position `target_start + t` of `input_ids` and is predicted one position earlier."""
        hidden = self._hidden(input_ids, attention_mask, position_ids)  # [B, P + T, H]
        n, t = targets.shape
        h = hidden[:, target_start - 1: target_start - 1 + t]  # [B, T, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        out = fused_linear_logprobs(h.reshape(n * t, -1), weight, targets.reshape(-1),
                                    temperature=temperature, return_entropy=return_entropy)
        if return_entropy:
            return out[0].reshape(n, t).clone(), out[1].reshape(n, t).clone()
        return out.reshape(n, t).clone()

    def packed_logprobs(self, input_ids, position_ids, sources, targets, temperature: float = 1.0,
                        return_entropy: bool = False, **attention):
        """[M] log-probs of `targets` (and [M] entropies) on one packed row [1, L]: target m is
        predicted at position `sources[m]`. `attention` carries the row's segments (`cu_seqlens`,
        `prefix_of`: model/attention.py); the model attends with "sdpa_varlen" for this call only
        (generation keeps its own attention)."""
        with attention_implementation(self.lm, VARLEN_ATTENTION):
            hidden = self._hidden(input_ids, None, position_ids, **attention)  # [1, L, H]
        h = hidden[0].index_select(0, sources)  # [M, H]: a prompt's last state serves its whole group
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        out = fused_linear_logprobs(h, weight, targets, temperature=temperature, return_entropy=return_entropy)
        return (out[0].clone(), out[1].clone()) if return_entropy else out.clone()

    def label_logprobs(self, input_ids, position_ids, labels, *, attention_mask=None,
                       temperature: float = 1.0, return_logits: bool = False, **attention):
        """[M] log-probs of the M label tokens (labels aligned with `input_ids`, -100 = none; the
        label at t is predicted at t-1). `attention` carries packed-attention arguments
        (sft/packing.py). `return_logits`: also the [M, V] logits, for a token-level KL."""
        hidden = self._hidden(input_ids, attention_mask, position_ids, **attention)  # [B, L, H]
        target = labels[:, 1:]  # [B, L-1]
        sel = target != -100
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        h = hidden[:, :-1][sel]  # [M, H]
        logps = fused_linear_logprobs(h, weight, target[sel], temperature=temperature)  # [M]
        if return_logits:
            return logps, (h @ weight.T).float() / temperature  # [M], [M, V]
        return logps


def cache_argument(lm: nn.Module) -> str:
    """The KV-cache keyword of `lm.forward` and its output: `cache` from transformers 5.2x on,
    `past_key_values` before (still accepted, with a deprecation warning, until 5.40)."""
    params = inspect.signature(type(lm).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
