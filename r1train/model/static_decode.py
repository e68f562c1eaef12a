"""Compiled decode steps over a static KV cache, in batch-size buckets (`rollout.compile_decode`).

On a GPU a decode step is a few hundred small kernels per token: the GPU suite measured ~30 ms a
step for 64 rows of a 24-layer 0.5B model on an H200, 75-90% of a GRPO step (bench/RESULTS.md),
set by kernel launches rather than arithmetic. Compiled with CUDA graphs
(`torch.compile(mode="reduce-overhead")`) a step is one graph replay. A graph needs fixed shapes
and fixed addresses, so the decode step here differs from the engine's eager one in three ways:

  * each batch size's KV cache is allocated once, at a fixed capacity, and written in place at a
    position held in a tensor (`StaticDecodeLayer`). For the Llama / Qwen2 / Qwen3 family the
    step is the decode-only forward (model/decode_forward.py): each row attends to its live
    columns only, [start, position], with the grouped KV heads read in place; other models run
    Hugging Face's forward, which attends over the whole capacity through a [rows, 1, 1,
    capacity] mask that hides prompt padding and what is not written yet;
  * live rows are padded up to a power of two (a bucket), so there is one graph per bucket rather
    than per row count; when compaction leaves at most half of a bucket, the rows move to the
    smaller one (padding rows attend to their own token only, and their logits are dropped);
  * the capacity only grows: a call that fits keeps the buckets' capacity (a graph for every
    prompt length would soon pass torch.compile's recompile limit), one that does not
    reallocates them at its own, rounded up to a multiple of CAPACITY_STEP.

The step also draws the next token (`sample_tokens`, with the rows' uniforms as an input), so a
step is the forward, the cache write and the sampler in one graph; the engine then writes the
tokens and checks for EOS with a few small operations outside it. Prefill is not compiled (its
shape changes every call); the engine runs it as before and the decoder copies its cache in.
The values are the eager step's: the same forward over the same keys and values, the positions
outside a row's live ones adding nothing (tests/test_static_decode.py: the same completions and
log-probs as the eager engine, greedy and sampled, in float64). One process only: FSDP's hooks
are not compiled (the engine refuses the option under FSDP).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from r1train.model.decode_forward import DecodeForward, unsupported
from r1train.model.engine import sample_tokens

# Capacity (prompt + new tokens) is rounded up to a multiple of this.
CAPACITY_STEP = 64
# Graphs torch.compile may hold for the decode step: one per bucket (log2 of the rows, plus
# one) and capacity; PyTorch's default (8) would leave 256 rows' smallest buckets uncompiled.
RECOMPILE_LIMIT = 64


def bucket_size(rows: int) -> int:
    """The smallest power of two >= rows: the batch size a step of `rows` live rows runs at."""
    return 1 << max(rows - 1, 0).bit_length()


class StaticDecodeLayer(DynamicLayer):
    """One layer's cache for one bucket: [bucket, H_kv, capacity, D] buffers, written in place at
    `position` (a [1] tensor shared by the cache's layers, set before each step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.position = keys, values, position
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.position, key_states)  # [bucket, H_kv, 1, D] at one position
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values


class _Bucket:
    """A bucket's persistent tensors: the cache, the mask and the step's inputs."""

    def __init__(self, size: int, layers: list[tuple[int, int, int]], capacity: int, dtypes, device):
        self.size, self.capacity = size, capacity
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = DynamicCache()
        k_dtype, v_dtype = dtypes  # under autocast keys are float32 (RoPE's tables) and values bf16
        self.cache.layers = [
            StaticDecodeLayer(torch.zeros(size, h, capacity, d, dtype=k_dtype, device=device),
                              torch.zeros(size, h, capacity, dv, dtype=v_dtype, device=device), self.position)
            for h, d, dv in layers]
        self.mask = torch.zeros(size, 1, 1, capacity, dtype=torch.bool, device=device)  # [bucket, 1, 1, cap]
        self.start = torch.zeros(size, dtype=torch.long, device=device)  # [bucket] first live column
        self.input_ids = torch.zeros(size, 1, dtype=torch.long, device=device)  # [bucket, 1]
        self.position_ids = torch.zeros(size, 1, dtype=torch.long, device=device)  # [bucket, 1]
        self.u = torch.zeros(size, dtype=torch.float64, device=device)  # [bucket] the next draw's uniforms
        if device.type == "cuda":  # fixed addresses: CUDA graphs read them in place
            for layer in self.cache.layers:
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            torch._dynamo.mark_static_address(self.position)
            torch._dynamo.mark_static_address(self.start)


def _copy_rows(layers, bucket: _Bucket, rows: torch.Tensor | None, length: int, clear: bool) -> None:
    """bucket's cache[:n, :, :length] = each layer's keys / values [rows, :, :length] (all rows when
    `rows` is None). `clear` zeroes the bucket first: what the mask hides stays finite (a stale
    NaN times a 0 weight is NaN)."""
    for src, dst in zip(layers, bucket.cache.layers):
        for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
            kept = s[:, :, :length] if rows is None else s[rows, :, :length]  # a copy: `d` may be `s`
            if clear:
                d.zero_()
            d[: len(kept), :, :length] = kept


class DecodeState:
    """The engine's handle on the decoder's cache during one `generate` call: which bucket holds
    the live rows. `batch_select_indices` is the engine's compaction (the cache interface)."""

    def __init__(self, decoder: "StaticDecoder", bucket: int, rows: int):
        self.decoder, self.bucket, self.rows = decoder, bucket, rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order): within the bucket, or in a smaller one when they
        fit in half of it."""
        old = self.decoder.buckets[self.bucket]
        size = bucket_size(len(indices))
        new = old if size >= old.size else self.decoder.bucket(size)
        length = int(old.position) + 1  # positions written so far
        _copy_rows(old.cache.layers, new, indices, length, clear=new is not old)
        new.position.copy_(old.position)
        self.bucket, self.rows = new.size, len(indices)


class StaticDecoder:
    """The engine's decode step, compiled over static buckets (module docstring).

    `backend`: torch.compile's backend (tests use "eager" / "aot_eager" to check tracing
    without code generation); with inductor on a CUDA model the mode is "reduce-overhead" (CUDA
    graphs). Buckets persist between calls: a graph is compiled once per (bucket, capacity, dtype).
    """

    def __init__(self, model, *, backend="inductor", direct: bool = True):
        self.model = model  # a PolicyModel
        # the decode-only forward where the model family has one (`direct` False: HF's, for tests)
        self.direct = DecodeForward(model.lm) if direct and unsupported(model.lm) is None else None
        self.buckets: dict[int, _Bucket] = {}
        self._kind = None  # (layer shapes, (key dtype, value dtype), device) the buckets were made for
        self._capacity = 0
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        cuda = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self._step = torch.compile(self._forward, mode=mode, backend=backend, dynamic=False)

    def _forward(self, input_ids, mask, position_ids, cache, start, u, temperature, top_k, top_p):
        """One decode step and the next token's draw: ([bucket] tokens, [bucket] their log-probs)."""
        if self.direct is not None:
            logits = self.direct(input_ids, position_ids, cache.layers, cache.layers[0].position, start)
        else:  # a 4-D mask is used as given (Hugging Face builds none); the cache writes in place
            out = self.model.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=True, logits_to_keep=1, **{self.model._cache_arg: cache})
            logits = out.logits[:, -1]
        return sample_tokens(logits.float(), u, temperature, top_k, top_p, return_logps=True)  # [bucket] x 2

    def bucket(self, size: int) -> _Bucket:
        if size not in self.buckets:
            layers, dtypes, device = self._kind
            self.buckets[size] = _Bucket(size, layers, self._capacity, dtypes, device)
        return self.buckets[size]

    def start(self, prefill, rows: torch.Tensor | None, n: int, capacity: int) -> DecodeState:
        """Copy the prefill's cache in: `prefill` holds [U, H_kv, P, D] per layer (the engine's
        PreallocatedLayers), `rows` [n] the prefill row of each generated row (None: row i is
        prefill row i). Returns the handle the engine decodes with."""
        first = prefill.layers[0].keys
        kind = ([(k.keys.shape[1], k.keys.shape[3], k.values.shape[3]) for k in prefill.layers],
                (first.dtype, prefill.layers[0].values.dtype), first.device)
        capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        if kind != self._kind or capacity > self._capacity:  # a call that fits keeps the buckets and graphs
            self.buckets, self._kind, self._capacity = {}, kind, capacity
        b = self.bucket(bucket_size(n))
        p = first.shape[2]
        _copy_rows(prefill.layers, b, rows, p, clear=True)
        b.position.fill_(p - 1)
        return DecodeState(self, b.size, n)

    def next_tokens(self, input_ids, attention_mask, position_ids, cache: DecodeState, u: torch.Tensor,
                    temperature: float, top_k: int, top_p: float):
        """A decode step and the draw of each row's next token, `sample_tokens` inside the
        compiled step: input_ids [L, 1], attention_mask [L, W] (the prompt's padding, then ones up
        to this token), position_ids [L, 1], u [L] the rows' uniforms for the next token ->
        (([L] tokens, [L] float64 log-probs), the handle)."""
        b = self.buckets[cache.bucket]
        n, w = input_ids.shape[0], attention_mask.shape[1]
        if n != cache.rows or w > b.capacity:
            raise RuntimeError(f"StaticDecoder: a step of {n} rows and {w} positions for a cache of "
                               f"{cache.rows} rows and {b.capacity} positions")
        b.position.fill_(w - 1)
        if self.direct is not None:  # the engine's masks are left padding, then ones up to this token
            b.start.fill_(w - 1)  # a padding row sees its own token only
            b.start[:n] = w - attention_mask.sum(-1)
        else:
            b.mask.zero_()
            b.mask[:n, 0, 0, :w] = attention_mask.bool()
            b.mask[n:, 0, 0, w - 1] = True  # a padding row sees its own token only
        b.input_ids.zero_()
        b.input_ids[:n] = input_ids
        b.position_ids.zero_()
        b.position_ids[:n] = position_ids
        b.u.zero_()
        b.u[:n] = u
        tokens, logps = self._step(b.input_ids, b.mask, b.position_ids, b.cache, b.start, b.u,
                                   temperature, top_k, top_p)  # [bucket] x 2
        # clone: a CUDA graph's outputs are overwritten by its next replay
        return (tokens[:n].clone(), logps[:n].clone()), cache
