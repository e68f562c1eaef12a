"""Kernels: per-token log-probs and entropies without materializing [tokens, vocab]; a decode
step's attention over each row's live keys."""
from r1train.kernels.decode_attention import decode_attention, eager_decode_attention
from r1train.kernels.logprobs import (
    eager_linear_logprobs,
    eager_token_logprobs,
    fused_linear_logprobs,
    token_logprobs,
)

__all__ = [
    "token_logprobs",
    "fused_linear_logprobs",
    "eager_token_logprobs",
    "eager_linear_logprobs",
    "decode_attention",
    "eager_decode_attention",
]
