"""Kernels: per-token log-probs and entropies without materializing [tokens, vocab]."""
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
]
