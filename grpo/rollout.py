"""Rollouts: batched sampling with a KV cache, `group_size` completions per prompt.

`PolicyModel` wraps a Hugging Face causal LM and is the FSDP root, so one module serves both
generation (logits of the last position, KV cache) and training (per-token log-probs of the
completion through the fused log-prob kernel, without materialising [tokens, vocab] logits).

Sampling is seeded per sequence, not per batch: each completion draws its uniforms from a
generator seeded by (seed, step, global row index) and samples by inverse CDF. The same row gets
the same completion whatever batch or rank it lands on, which is what makes a 2-process run
reproduce a 1-process run, and a resumed run reproduce an uninterrupted one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from infra.model import eos_token_ids as default_eos_ids
from kernels import fused_linear_logprobs


class PolicyModel(nn.Module):
    """A causal LM with two forwards: `logits` (generation) and `logprobs` (training)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, *, past_key_values=None,
                targets=None, target_start: int = 0, temperature: float = 1.0,
                return_entropy: bool = False, labels=None, return_logits: bool = False,
                **model_inputs):
        if labels is not None:
            # SFT: log-probs of every label token (labels aligned with input_ids, -100 = no loss);
            # `model_inputs` carries the packed-attention arguments (sft/packing.py).
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, **model_inputs).last_hidden_state
            target = labels[:, 1:]  # [B, L-1]: token t+1 is predicted at position t
            sel = target != -100
            weight = self.lm.get_output_embeddings().weight
            h = hidden[:, :-1][sel]  # [M, H]
            logps = fused_linear_logprobs(h, weight, target[sel], temperature=temperature)  # [M]
            if return_logits:  # distillation's token-level KL needs whole distributions: [M, V]
                return logps, (h @ weight.T).float() / temperature
            return logps
        if targets is None:
            cache_arg = _cache_argument(self.lm)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, logits_to_keep=1,
                          **{cache_arg: past_key_values})
            return out.logits[:, -1].float().clone(), out[cache_arg]  # clone: FSDP2 dislikes views
        # Completion token t sits at position target_start + t and is predicted by the hidden
        # state one position earlier.
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids).last_hidden_state
        n, t = targets.shape
        h = hidden[:, target_start - 1: target_start - 1 + t]  # [B, T, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        out = fused_linear_logprobs(h.reshape(n * t, -1), weight, targets.reshape(-1),
                                    temperature=temperature, return_entropy=return_entropy)
        if return_entropy:
            return out[0].reshape(n, t).clone(), out[1].reshape(n, t).clone()
        return out.reshape(n, t).clone()


def _cache_argument(lm: nn.Module) -> str:
    """The KV-cache keyword of `lm.forward` and its output: `cache` from transformers 5.2x on,
    `past_key_values` before (still accepted, with a deprecation warning, until 5.40)."""
    params = inspect.signature(type(lm).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count real tokens only, so position 0 is each prompt's first."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def row_uniforms(seeds: list[int], n: int, device) -> torch.Tensor:
    """[B, n] uniforms in [0, 1), row b drawn from its own generator seeded by seeds[b]."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) % (2**63 - 1))
        rows.append(torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: tokens outside are set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """One token per row by inverse CDF with the row's own uniform `u` [B]; greedy at T=0."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)  # [B, V]
    cdf = probs.cumsum(-1)
    # the first token whose cdf exceeds u (right=True): a filtered-out token adds nothing to
    # the cdf, so it is never picked, not even at u = 0
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp(max=logits.shape[-1] - 1)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P]
    completion_ids: torch.Tensor   # [B, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, T] 1 up to and including EOS / the stop string
    truncated: torch.Tensor        # [B] bool: hit max_new_tokens without EOS or stop
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
             seeds: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_ids: list[int] | None = None,
             stop_strings: list[str] | None = None, all_done=None) -> Rollout:
    """Sample one completion per row of the left-padded `prompt_ids` with a KV cache.

    `model` is a `PolicyModel` (or anything with its `logits` forward). `all_done(bool) -> bool`
    lets ranks agree to stop together, as FSDP ranks must run the same number of forwards.
    `eos_token_ids` defaults to every EOS id of the tokenizer and of the model's generation
    config (`infra.model.eos_token_ids`): Qwen2.5-Instruct ends turns with either of two.
    """
    device = prompt_ids.device
    b = prompt_ids.shape[0]
    pad = tokenizer.pad_token_id
    if eos_token_ids is None:
        eos_token_ids = default_eos_ids(tokenizer, getattr(model, "lm", None))
    eos = torch.tensor(eos_token_ids, device=device)
    u = row_uniforms(seeds, max_new_tokens, device)  # [B, max_new]
    p = prompt_ids.shape[1]
    # One mask for the whole run, sliced per step (no re-allocation per token).
    full_mask = torch.cat([prompt_mask, torch.ones((b, max_new_tokens), dtype=prompt_mask.dtype,
                                                    device=device)], dim=1)  # [B, P + max_new]
    logits, cache = model(prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask))
    next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1]: position of the first completion token
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished_by = torch.zeros(b, dtype=torch.bool, device=device)  # EOS or stop string seen
    steps = 0
    for t in range(max_new_tokens):
        tok = sample_tokens(logits, u[:, t], temperature, top_k, top_p)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[:, t] = tok
        hit = torch.isin(tok, eos) & ~done
        if stop_strings:
            hit |= _stop_hit(tokenizer, out[:, : t + 1], stop_strings) & ~done
        finished_by |= hit
        done |= hit
        steps = t + 1
        local_done = bool(done.all())
        if (all_done(local_done) if all_done is not None else local_done) or t + 1 == max_new_tokens:
            break
        logits, cache = model(tok[:, None], full_mask[:, : p + t + 1], next_pos + t, past_key_values=cache)
    out = out[:, :steps]
    # Mask: every token up to and including the one that finished the row (all when truncated).
    last = torch.full_like(done, steps - 1, dtype=torch.long)
    finish_at = torch.where(finished_by, _first_finish(out, eos, tokenizer, stop_strings), last)
    completion_mask = (torch.arange(steps, device=device)[None, :] <= finish_at[:, None]).long()
    out = out.masked_fill(completion_mask == 0, pad)
    texts = tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(out, completion_mask)],
                                   skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, out, completion_mask, ~finished_by, texts)


def _stop_hit(tokenizer, ids: torch.Tensor, stop_strings: list[str], window: int = 16) -> torch.Tensor:
    tails = tokenizer.batch_decode(ids[:, -window:].tolist(), skip_special_tokens=False)
    return torch.tensor([any(s in tail for s in stop_strings) for tail in tails], device=ids.device)


def _first_finish(out, eos, tokenizer, stop_strings) -> torch.Tensor:
    """Index of the token that finished each row: its first EOS, or where a stop string ended."""
    steps = out.shape[1]
    is_eos = torch.isin(out, eos)
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(out[:, 0], steps))
    if not stop_strings:
        return first_eos
    first = first_eos.clone()
    for i in range(out.shape[0]):
        for t in range(min(int(first_eos[i]), steps)):
            tail = tokenizer.decode(out[i, max(0, t - 15): t + 1].tolist(), skip_special_tokens=False)
            if any(s in tail for s in stop_strings):
                first[i] = t
                break
    return first


def pad_prompts(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into [B, P] ids and mask."""
    p = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), p), dtype=torch.long)
    for i, x in enumerate(token_lists):
        ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)
