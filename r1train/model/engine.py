"""The generation engine: how every stage samples from a policy.

GRPO rollouts, held-out evaluation, rejection sampling, distillation traces and cold-start data
all call `Engine.generate(prompts, seeds, ...)`. The engine owns what each of them would
otherwise repeat around the token loop: eval mode and FSDP gathering for the call (parameters
stay gathered between tokens instead of being all-gathered once per token), autocast, the EOS
ids, and rank agreement: FSDP ranks must run the same number of forwards, so a rank with no
prompt left generates a dummy row, and ranks stop together when all are done (or when a stop
signal arrives on any of them).

`generate` below is the token loop itself: prefill, then one decode step per token with a KV
cache. Prefill computes each distinct prompt once: the G rows of a GRPO group then copy its
cache. Decoding runs on the rows still going: once a quarter of the batch has finished since the
last compaction, finished rows leave the batch and the cache (copying the cache costs about one
decode step, so it is not done for every row that ends). On a GPU which rows are done is read
every 8 steps, not every step (a read is a host sync, and the GPU idles while the host then
queues the next step). Stop strings are looked for only in rows whose new token can complete
one (`stop_candidates`), in the text of their last tokens.
On a CPU, the decode step's matrix products take the form that is fastest there for a few rows
(`few_row_linears`). On a GPU, `Engine(compile_decode=True)` runs the decode steps compiled with
CUDA graphs over a static cache (model/static_decode.py).
Sampling is seeded per sequence, not per batch: each completion draws its uniforms from a
generator seeded by its own seed (`row_seed(seed, step, global row)` in training) and samples by
inverse CDF. The same row gets the same completion whatever batch or rank it lands on, which is
what makes a 2-process run reproduce a 1-process run, and a resumed run an uninterrupted one.
Each sampled token's log-probability under the distribution it was drawn from comes back too
(`Rollout.logps`, from the probabilities the draw already computed): the sampler's side of the
trainer's rollout correction (grpo/loss.py `rollout_correction`).

Multi-turn rows (`generate(..., turns=...)`, rollout.tools): a row pauses when its segment
closes a tool call, and the next forward feeds it the tool turn after its sampled token, in its
own KV cache (model/multiturn.py). Without `turns` the loop is the single-turn one, bit for bit.
"""
from __future__ import annotations

import types
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from r1train.model.load import eos_token_ids as default_eos_ids
from r1train.run.dist import DistInfo, all_reduce_sum, set_gathered


def row_seed(seed: int, step: int, row: int) -> int:
    """Seed of one completion's sampler: depends on (seed, step, global row) only."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + row * 0xC2B2AE3D) % (2**61 - 1)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count real tokens only, so position 0 is each prompt's first."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_prompts(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into [B, P] ids and mask."""
    p = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), p), dtype=torch.long)
    for i, x in enumerate(token_lists):
        ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)


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
                  top_p: float, return_logps: bool = False):
    """One token per row by inverse CDF with the row's own uniform `u` [B]; greedy at T=0.

    `return_logps`: also the [B] float64 log-probability of each token under the distribution it
    was drawn from: softmax(logits / temperature), restricted by top_k / top_p to the tokens they
    keep and renormalized over them (what vLLM calls "processed" log-probs). With top_k or
    top_p on, that is not the policy's own distribution: the kept tokens' log-probs rise by
    -log(kept mass). Greedy decoding draws from a point mass: log-prob 0."""
    if temperature == 0.0:
        tokens = logits.argmax(-1)
        return (tokens, torch.zeros(tokens.shape, dtype=torch.float64, device=logits.device)) if return_logps \
            else tokens
    probs = filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)  # [B, V]
    cdf = probs.cumsum(-1)
    # the first token whose cdf exceeds u (right=True): a filtered-out token adds nothing to
    # the cdf, so it is never picked, not even at u = 0
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    tokens = idx.clamp(max=logits.shape[-1] - 1)
    if not return_logps:
        return tokens
    # The draw is from probs / cdf[-1] (cdf[-1] is 1 up to rounding). From the probabilities
    # already made, not a log_softmax: no second [B, V] tensor; float64 keeps log p exact to
    # ~1e-16 relative for any p a draw can reach.
    logps = probs.gather(-1, tokens[:, None]).squeeze(-1).log() - cdf[:, -1].log()  # [B]
    return tokens, logps


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P]
    completion_ids: torch.Tensor   # [B, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, T] 1 up to and including EOS / the stop string
    truncated: torch.Tensor        # [B] bool: hit max_new_tokens without EOS or stop
    texts: list[str]
    logps: torch.Tensor | None = None  # [B, T] float64 log-prob of each token under the distribution
    #                                    it was sampled from (`sample_tokens`), 0 after the row's end
    #                                    and on inserted tool turns
    model_mask: torch.Tensor | None = None  # [B, T] multi-turn rows: 1 on tokens the model wrote, 0 on
    #                                         the tool turns inserted between its segments (None: no turns)
    episodes: list[dict] | None = None  # multi-turn rows: each row's turns, tool calls and messages

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # [B]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
             seeds: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_ids: list[int] | None = None,
             stop_strings: list[str] | None = None, all_done=None, share_prompts: bool = True,
             compact: bool = True, few_rows: bool = True, decoder=None, turns=None,
             sync_every: int = 1) -> Rollout:
    """Sample one completion per row of the left-padded `prompt_ids` with a KV cache.

    `model` has `PolicyModel.next_token_logits`. `all_done(bool) -> bool` lets ranks agree to
    stop together. `eos_token_ids` defaults to every EOS id of the tokenizer and of the model's
    generation config (`model.load.eos_token_ids`): Qwen2.5-Instruct ends turns with either of two.
    `share_prompts` / `compact` / `few_rows` off give the plain path (every row prefilled, every
    row decoded to the end, `nn.Linear` as it is), for tests and `bench/bench_grpo_step.py`.
    `decoder`: an `model.static_decode.StaticDecoder` that runs the decode steps compiled, each
    step drawing the next token inside its graph with the same `sample_tokens` and uniforms (for
    models whose cache is all full attention; others decode eagerly).
    `turns`: multi-turn rows (`tools.episodes.ToolEpisodes`; model/multiturn.py); None: one
    assistant turn per row, as before it existed.
    `sync_every`: read which rows are still going (a host sync: the GPU's queue drains) every
    this many steps rather than every step. In between, finished rows keep being decoded (their
    input is the pad token, as until a compaction anyway) and the ranks' agreement to stop waits
    for the next check; the completions are the same, the last up to sync_every - 1 steps and
    a compaction later. Stop strings and multi-turn rows are looked for on the host: with
    either, every step checks.
    """
    if turns is not None and decoder is not None:
        raise ValueError("rollout.compile_decode does not take multi-turn rows (rollout.tools): "
                         "their decode steps insert tool turns of varying widths")
    with few_row_linears(model) if few_rows else nullcontext():
        device = prompt_ids.device
        b, p = prompt_ids.shape
        pad = tokenizer.pad_token_id
        if eos_token_ids is None:
            eos_token_ids = default_eos_ids(tokenizer, getattr(model, "lm", None))
        eos = torch.tensor(eos_token_ids, device=device)
        candidates = stop_candidates(tokenizer, stop_strings) if stop_strings else None
        if candidates is not None:
            candidates = candidates.to(device)
        u = row_uniforms(seeds, max_new_tokens, device)  # [B, max_new]
        # One mask for the whole run, sliced per step (no re-allocation per token).
        full_mask = torch.cat([prompt_mask, torch.ones((b, max_new_tokens), dtype=prompt_mask.dtype,
                                                        device=device)], dim=1)  # [B, P + max_new]
        # prefill: each distinct prompt once, every prompt token at once; the logits of its last position
        first, inverse = distinct_rows(prompt_ids, prompt_mask) if share_prompts else (torch.arange(b), None)
        # a decoder decodes in its own cache, and only after a prefill into PreallocatedLayers
        prefill = preallocated_cache(model, p if decoder is not None else p + max_new_tokens,
                                     grow=turns is not None)
        logits, cache = model.next_token_logits(prompt_ids[first], prompt_mask[first],
                                                position_ids_from_mask(prompt_mask[first]), cache=prefill)  # [U, V]
        shared = len(first) < b  # rows of one prompt share its prefill
        if shared:
            logits = logits[inverse]
        use_decoder = decoder is not None and prefill is not None
        if use_decoder:
            cache = decoder.start(cache, inverse if shared else None, b, p + max_new_tokens)
        elif shared:
            cache.batch_select_indices(inverse)
        next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1]: position of the first completion token
        out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)  # [B, max_new]
        out_logps = torch.zeros((b, max_new_tokens), dtype=torch.float64, device=device)  # [B, max_new]
        finish_at = torch.full((b,), -1, dtype=torch.long, device=device)  # [B] token that ended the row
        live = torch.arange(b, device=device)  # [L] rows in the decode batch (and the cache)

        def forward(tok, live, t, cache):
            """Feed the live rows' token t: (logits of token t + 1, None, cache), or with the
            compiled decoder (None, its draw of token t + 1, cache)."""
            ids, mask, pos = tok[:, None], full_mask[live, : p + t + 1], next_pos[live] + t
            if use_decoder:
                drawn, cache = decoder.next_tokens(ids, mask, pos, cache, u[live, t + 1], temperature, top_k, top_p)
                return None, drawn, cache
            logits, cache = model.next_token_logits(ids, mask, pos, cache=cache)
            return logits, None, cache

        rows = None
        if turns is not None:
            from r1train.model.multiturn import MultiTurnRows  # it imports this module
            rows = MultiTurnRows(turns, tokenizer, prompt_mask, max_new_tokens, next_pos)
        steps = 0
        check_every = 1 if stop_strings or turns is not None else max(1, sync_every)
        drawn = None  # the compiled decoder's draw of the next token
        for t in range(max_new_tokens):
            done = finish_at[live] >= 0  # [L]
            # step t draws every row's model token t, multi-turn rows too (a tool turn is fed with
            # the token before it, in the same forward): u[row, t] is indexed by the row's own count
            if drawn is None:
                tok, logp = sample_tokens(logits, u[live, t], temperature, top_k, top_p, return_logps=True)  # [L]
            else:
                tok, logp = drawn
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            if rows is None:
                out[live, t] = tok
                out_logps[live, t] = torch.where(done, 0.0, logp)
            else:
                col = rows.write(out, out_logps, live, done, tok, logp)  # [L] the column each token went to
            hit = torch.isin(tok, eos)
            if stop_strings:  # decode only the rows whose new token can complete a stop string
                check = ~done
                if candidates is not None:  # ids past the tokenizer's (a padded embedding table) always count
                    v = len(candidates)
                    check &= (tok >= v) | candidates[tok.clamp(max=v - 1)]
                at = check.nonzero().squeeze(1)  # [R]
                if len(at) and rows is None:
                    hit[at] |= _stop_hit(tokenizer, out[live[at], : t + 1], stop_strings)
                elif len(at):  # the row's current segment only: a tool turn may hold a stop string
                    hit[at] |= rows.tail_holds(out, live[at], stop_strings)
            # where() rather than finish_at[live[hit & ~done]]: a boolean index is a host sync
            finish_at[live] = torch.where(hit & ~done, t if rows is None else col, finish_at[live])
            if rows is not None:  # a tool call pauses a row; the budget or max_turns ends it
                rows.after_token(out, out_logps, live, done | hit, tok, finish_at)
            steps = t + 1
            if (t + 1) % check_every and t + 1 < max_new_tokens:  # no host sync at this step
                logits, drawn, cache = forward(tok, live, t, cache)
                continue
            going = finish_at[live] < 0  # [L]
            n_going = int(going.sum())  # the check's one host sync (besides the ranks' agreement)
            local_done = n_going == 0
            if (all_done(local_done) if all_done is not None else local_done) or t + 1 == max_new_tokens:
                break
            if compact and not local_done and n_going <= 0.75 * len(live):  # compaction (module docstring)
                keep = going.nonzero().squeeze(1)  # [L']
                live, tok = live[keep], tok[keep]
                cache.batch_select_indices(keep)
            if rows is not None:  # the sampled tokens, and after them the rows' inserted tool turns
                logits, cache = rows.forward(model.next_token_logits, live, tok, cache)
                continue
            # decode: one token per live row against the cache
            logits, drawn, cache = forward(tok, live, t, cache)
        if rows is not None:
            return rows.rollout(prompt_ids, prompt_mask, out, out_logps, finish_at)
        truncated = finish_at < 0  # [B] no EOS or stop string within max_new_tokens
        if check_every > 1 and all_done is None and not bool(truncated.any()):
            steps = min(steps, int(finish_at.max()) + 1)  # the steps past the last row's end
            # (ranks that agree on when to stop keep them: their rollouts stay the same width)
        out = out[:, :steps]
        last = torch.where(truncated, torch.full_like(finish_at, steps - 1), finish_at)  # [B]
        # Mask: every token up to and including the one that finished the row (all when truncated).
        completion_mask = (torch.arange(steps, device=device)[None, :] <= last[:, None]).long()
        out = out.masked_fill(completion_mask == 0, pad)
        logps = out_logps[:, :steps].masked_fill(completion_mask == 0, 0.0)  # [B, T]
        texts = tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(out, completion_mask)],
                                       skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, out, completion_mask, truncated, texts, logps)


# At most this many rows take the (W @ x^T)^T form: a decode step's live rows, not a prefill
# (at 128 rows F.linear is as fast again, bench/bench_decode_matmul.py).
FEW_ROWS = 64
# Smaller weights (the embedded tiny model's, 65,536 at most) gain nothing and pay the Python call.
FEW_ROWS_MIN_WEIGHT = 100_000


def _few_row_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` as (W @ x^T)^T when `x` holds at most FEW_ROWS rows (few_row_linears)."""
    k = x.shape[-1]
    if x.numel() > FEW_ROWS * k:
        return F.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(-1, k).t()).t()  # [rows, N]
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1]).contiguous()


@contextmanager
def few_row_linears(model: nn.Module):
    """Within the block, the model's CPU `nn.Linear` layers compute few rows as (W @ x^T)^T.

    A decode step multiplies a handful of rows (the live rows, one token each) by every weight
    matrix. On a CPU, MKL's sgemm for x @ W^T with 16-64 rows is slower than the same product
    taken as W @ x^T: on the 2-core AMD EPYC this project is tested on, the 211 matrices of one
    SmolLM2-135M decode step took 0.65-0.75x the time at 16 rows and 0.83-0.93x at 64, the
    576 x 49,152 output embedding alone 0.54-0.73x; at 128 rows and at 1 row there is no gain
    (`bench/bench_decode_matmul.py`, bench/RESULTS.md). The values are the same products
    summed in another order (float32 rounding apart). Prefill (more than FEW_ROWS rows), GPU
    weights and small weights keep `F.linear`. Only plain `nn.Linear` modules are touched, and
    the base product of linear layers that name it `base_forward` (LoRA's, model/lora.py, whose
    adapter term stays as it is); all restored on exit.
    """
    big = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"
           and m.weight.numel() >= FEW_ROWS_MIN_WEIGHT]
    patched = [(m, "forward" if type(m) is nn.Linear else "base_forward") for m in big
               if type(m) is nn.Linear or hasattr(type(m), "base_forward")]
    for m, name in patched:
        setattr(m, name, types.MethodType(_few_row_forward, m))
    try:
        yield [m for m, _ in patched]
    finally:
        for m, name in patched:
            delattr(m, name)


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer of `capacity` positions, allocated at prefill: a decode
    step writes its token in place instead of concatenating a new [B, H, T, D] tensor per layer
    (a copy of the whole cache, every token). `keys` / `values` are views of the filled part, as
    DynamicLayer's tensors are."""

    def __init__(self, capacity: int, grow: bool = False):
        super().__init__()
        self.capacity, self.length, self.grow = capacity, 0, grow

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.buf_k = key_states.new_empty(b, h, self.capacity, d)  # [B, H_kv, capacity, D]
            self.buf_v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
            self.device, self.is_initialized = key_states.device, True
        if self.length + n > self.capacity:
            if not self.grow:
                raise RuntimeError(f"PreallocatedLayer: {self.length + n} positions exceed the capacity "
                                   f"{self.capacity}")
            # multi-turn rows: tool turns add columns that no budget bounds in advance (MultiTurnRows)
            self.capacity = max(self.length + n, 2 * self.capacity)
            for name in ("buf_k", "buf_v"):
                buf = getattr(self, name)
                new = buf.new_empty(*buf.shape[:2], self.capacity, buf.shape[-1])
                new[:, :, : self.length] = buf[:, :, : self.length]
                setattr(self, name, new)
        self.buf_k[:, :, self.length: self.length + n] = key_states
        self.buf_v[:, :, self.length: self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order, repeats allowed): the filled part is copied."""
        if not self.is_initialized:
            return
        for name in ("buf_k", "buf_v"):
            buf = getattr(self, name)
            new = buf.new_empty(len(indices), *buf.shape[1:])
            new[:, :, : self.length] = buf[indices, :, : self.length]
            setattr(self, name, new)
        self.keys, self.values = self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length]


def preallocated_cache(model: nn.Module, capacity: int, grow: bool = False) -> Cache | None:
    """A cache of PreallocatedLayers for the Hugging Face model under `model` (a PolicyModel), or
    None (the model then makes its own) when its layers are not all full attention. `grow`: a
    layer reallocates past `capacity` instead of raising (multi-turn rows)."""
    config = getattr(getattr(model, "lm", None), "config", None)
    if config is None:
        return None
    text = config.get_text_config(decoder=True)
    if set(getattr(text, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return None
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(capacity, grow) for _ in range(text.num_hidden_layers)]
    return cache


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt [U], the distinct prompt of each row [B])."""
    index: dict[tuple, int] = {}
    first, inverse = [], []
    for i, key in enumerate(zip(ids.tolist(), mask.tolist())):
        key = (tuple(key[0]), tuple(key[1]))
        if key not in index:
            index[key] = len(first)
            first.append(i)
        inverse.append(index[key])
    return torch.tensor(first, device=ids.device), torch.tensor(inverse, device=ids.device)


def _stop_hit(tokenizer, ids: torch.Tensor, stop_strings: list[str], window: int = 16) -> torch.Tensor:
    """[R] whether the text of each row's last `window` tokens holds a stop string."""
    tails = tokenizer.batch_decode(ids[:, -window:].tolist(), skip_special_tokens=False)
    return torch.tensor([any(s in tail for s in stop_strings) for tail in tails], device=ids.device)


_STOP_CANDIDATES: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def stop_candidates(tokenizer, stop_strings: list[str]) -> torch.Tensor | None:
    """[V] bool: the tokens that can complete a stop string, or None when any token can.

    A stop string absent before a token and present after it ends with a character of that
    token's text, so a row whose new token's text holds no stop string's last character needs
    no decoding. Conservative where one token's own decode may differ from its decode in
    context: a token that decodes to U+FFFD (part of a multi-byte character) is a candidate, and
    a stop string ending in whitespace (which a tokenizer may strip from a lone token) makes
    every token one. Computed once per tokenizer and stop strings (one decode of the vocabulary).
    """
    lasts = {s[-1] for s in stop_strings if s}
    if any(c.isspace() for c in lasts):
        return None
    known = _STOP_CANDIDATES.setdefault(tokenizer, {})
    key = (len(tokenizer), tuple(sorted(lasts)))
    if key not in known:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        known[key] = torch.tensor([("\ufffd" in t) or any(c in t for c in lasts) for t in texts], dtype=torch.bool)
    return known[key]


# On a GPU, steps between two reads of the rows still going (Engine, `generate`'s sync_every).
SYNC_EVERY = 8


class Engine:
    """`generate` for a policy, with everything around it that every caller needs (module doc).

    `autocast`: a context-manager factory for the forwards (bf16 on a single GPU); `info`: the
    rank layout (None = one process); `plain`: every row prefilled and decoded to the end (the
    oracle path, for tests and benchmarks); `compile_decode`: decode steps compiled over a static
    cache in batch-size buckets (model/static_decode.py; CUDA graphs on a GPU), one process only;
    `compile_option`: the option that set it, named by the error under FSDP. On a GPU the token
    loop reads which rows are done every SYNC_EVERY steps (`generate`'s `sync_every`): a host
    sync per step would leave the GPU idle while the host queues the next step.
    """

    def __init__(self, model: nn.Module, tokenizer, info: DistInfo | None = None, *,
                 autocast: Callable[[], object] = nullcontext, eos_token_ids: list[int] | None = None,
                 plain: bool = False, compile_decode: bool = False,
                 compile_option: str = "rollout.compile_decode"):
        self.model, self.tokenizer, self.info, self.autocast = model, tokenizer, info, autocast
        self.plain = plain
        self.eos_token_ids = eos_token_ids or default_eos_ids(tokenizer, getattr(model, "lm", None))
        self.decoder = None
        self.sync_every = SYNC_EVERY if self.device.type == "cuda" and not plain else 1
        if compile_decode:
            if info is not None and info.distributed:
                raise ValueError(f"{compile_option} needs an unsharded model (FSDP's hooks are not "
                                 f"compiled), and this run shards it over {info.world_size} process(es): "
                                 "turn it off, or run one process with train.fsdp auto")
            from r1train.model.static_decode import StaticDecoder
            self.decoder = StaticDecoder(model)

    @property
    def device(self) -> torch.device:
        return self.info.device if self.info is not None else next(self.model.parameters()).device

    def _all_done(self, stop_requested: Callable[[], bool] | None):
        """Stop when every rank is done, or as soon as any rank got a stop signal: one
        all-reduce per token (FSDP ranks must run the same number of forwards)."""
        distributed = self.info is not None and self.info.distributed
        if not distributed and stop_requested is None:
            return None

        def all_done(local_done: bool) -> bool:
            flags = torch.tensor([0.0 if local_done else 1.0,
                                  float(stop_requested()) if stop_requested else 0.0], device=self.device)
            running, stopping = all_reduce_sum(flags).tolist()
            return running == 0 or stopping > 0
        return all_done

    def generate(self, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_strings: list[str] | None = None,
                 stop_requested: Callable[[], bool] | None = None, turns=None) -> Rollout | None:
        """One completion per prompt (token lists), row i sampled with seeds[i]. Collective under
        FSDP: every rank calls it the same number of times; a rank with no prompts joins with a
        dummy row and gets None back. `turns`: multi-turn rows (module docstring), one per prompt."""
        if len(prompts) != len(seeds):
            raise ValueError(f"Engine.generate: {len(prompts)} prompts but {len(seeds)} seeds")
        idle = not prompts
        if idle:
            prompts, seeds = [[self.tokenizer.pad_token_id]], [0]
        was_training = self.model.training
        self.model.eval()
        set_gathered(self.model, True)
        try:
            ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id, self.device)
            with self.autocast():
                out = generate(self.model, self.tokenizer, ids, mask, seeds=seeds,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, eos_token_ids=self.eos_token_ids,
                               stop_strings=stop_strings, all_done=self._all_done(stop_requested),
                               share_prompts=not self.plain, compact=not self.plain,
                               few_rows=not self.plain, decoder=None if self.plain else self.decoder,
                               turns=None if idle else turns, sync_every=self.sync_every)
        finally:
            set_gathered(self.model, False)
            self.model.train(was_training)
        return None if idle else out
