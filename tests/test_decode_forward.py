"""The decode-only forward (r1train/model/decode_forward.py) against Hugging Face's own forward,
and its attention op (r1train/kernels/decode_attention.py) against a float64 per-row loop.

The forward is checked in float64 over several decode steps of left-padded rows: each step's
logits must equal the logits the model's full forward gives at that position (1e-12), for the
three families it covers, with a LoRA adapter on and off. The Triton kernel runs under Triton's
interpreter in a child process (float32, small shapes), as tests/test_kernels.py does."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from r1train.kernels.decode_attention import decode_attention, eager_decode_attention
from r1train.model.decode_forward import DecodeForward, unsupported
from r1train.model.engine import position_ids_from_mask
from r1train.model.policy import cache_argument

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="run by test_triton_under_interpreter")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="needs a CUDA GPU")


def attention_oracle(q, keys, values, start, end, scale):
    """softmax(q k^T * scale) v per row and query head, over keys [start, end) of the KV head
    that head h reads (h // G, Hugging Face's `repeat_kv` order), in float64."""
    b, h, d = q.shape
    g = h // keys.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            k = keys[i, j // g, start[i]:end[i]].double()  # [n, D]
            v = values[i, j // g, start[i]:end[i]].double()
            w = torch.softmax(k @ q[i, j].double() * scale, dim=0)  # [n]
            out[i, j] = w @ v
    return out


def _attention_case(b, h, h_kv, c, d, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=gen)
    keys = torch.randn(b, h_kv, c, d, generator=gen)
    values = torch.randn(b, h_kv, c, d, generator=gen)
    end = torch.randint(1, c + 1, (b,), generator=gen)
    end[0] = c  # the whole capacity
    start = (torch.rand(b, generator=gen) * end).long()
    start[-1] = end[-1] - 1  # one key: a padding row of the decoder
    return [t.to(device=device, dtype=dtype) for t in (q, keys, values)] + [start.to(device), end.to(device)]


def test_one_live_key_gives_its_value():
    """Hand-derived: a row whose live range is one key gets that key's value exactly (softmax of
    one score is 1), whatever the stale keys around it hold."""
    q = torch.randn(1, 2, 4, dtype=torch.float64)
    keys = torch.full((1, 1, 5, 4), 1e3, dtype=torch.float64)
    values = torch.arange(20, dtype=torch.float64).reshape(1, 1, 5, 4)
    out = eager_decode_attention(q, keys, values, torch.tensor([3]), torch.tensor([4]), 0.5)
    assert torch.equal(out, values[:, :, 3].expand(1, 2, 4))


@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (14, 2)])
def test_eager_attention_matches_the_float64_loop(h, h_kv):
    q, keys, values, start, end = _attention_case(5, h, h_kv, 37, 16, seed=h * 10 + h_kv, dtype=torch.float64)
    out = eager_decode_attention(q, keys, values, start, end, 16 ** -0.5)
    assert_close(out, attention_oracle(q, keys, values, start, end, 16 ** -0.5), rtol=1e-12, atol=1e-12)
    out32 = decode_attention(q.float(), keys.float(), values.float(), start, end, 16 ** -0.5)
    assert out32.dtype == torch.float32
    assert_close(out32.double(), attention_oracle(q, keys, values, start, end, 16 ** -0.5), rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("b,h,h_kv,c,d,block_n", [(3, 4, 2, 70, 24, 16), (2, 14, 2, 33, 64, 64),
                                                   (4, 2, 2, 100, 8, 32), (1, 8, 1, 5, 16, 16)])
def test_triton_kernel_matches_the_float64_loop(b, h, h_kv, c, d, block_n):
    from r1train.kernels.triton_decode_attention import triton_decode_attention

    q, keys, values, start, end = _attention_case(b, h, h_kv, c, d, seed=b + h + c)
    out = triton_decode_attention(q, keys, values, start, end, d ** -0.5, block_n=block_n)
    assert_close(out.double(), attention_oracle(q, keys, values, start, end, d ** -0.5), rtol=2e-5, atol=2e-5)
    # the public entry point takes the kernel here (float32 CPU tensors under the interpreter)
    assert torch.equal(decode_attention(q, keys, values, start, end, d ** -0.5),
                       triton_decode_attention(q, keys, values, start, end, d ** -0.5))


@needs_interpreter
def test_triton_kernel_reads_strided_cache_views():
    """The decoder passes views (a bucket's rows, a head-dimension-contiguous cache); a cache
    whose head dimension is not contiguous is refused by name."""
    from r1train.kernels.triton_decode_attention import triton_decode_attention

    q, keys, values, start, end = _attention_case(6, 4, 2, 40, 16, seed=3)
    out = triton_decode_attention(q[::2], keys[::2], values[::2], start[::2], end[::2], 0.25)
    assert_close(out.double(), attention_oracle(q[::2], keys[::2], values[::2], start[::2], end[::2], 0.25),
                 rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="head dimension contiguous"):
        triton_decode_attention(q, keys.transpose(2, 3).contiguous().transpose(2, 3), values, start, end, 0.25)


@needs_interpreter
def test_triton_kernel_inside_a_compiled_decode_step(monkeypatch):
    """The GPU's compiled step, on the CPU: the decode-only forward under torch.compile
    (`fullgraph`, aot_eager) with its attention running the Triton kernel (interpreted) as an
    opaque custom-op node of the graph, against the same step uncompiled with the eager attention."""
    from r1train.kernels import triton_decode_attention as kernel_module

    lm = _model("qwen2").float()
    gen = torch.Generator().manual_seed(4)
    cache = [SimpleNamespace(keys=torch.randn(3, 2, 16, 8, generator=gen),
                             values=torch.randn(3, 2, 16, 8, generator=gen)) for _ in lm.model.layers]
    ids, pos = torch.tensor([[5], [6], [7]]), torch.tensor([[9], [4], [0]])
    at, start = torch.tensor([9]), torch.tensor([0, 5, 9])
    step = DecodeForward(lm)
    launches = []
    kernel = kernel_module.triton_decode_attention
    monkeypatch.setattr(kernel_module, "triton_decode_attention",
                        lambda *a, **k: launches.append(1) or kernel(*a, **k))
    with torch.no_grad():
        got = torch.compile(step.__call__, backend="aot_eager", fullgraph=True)(
            ids, pos, [SimpleNamespace(keys=c.keys.clone(), values=c.values.clone()) for c in cache], at, start)
        assert len(launches) == len(lm.model.layers)  # the kernel ran, once a layer
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference: the eager attention
        want = step(ids, pos, cache, at, start)
    assert len(launches) == len(lm.model.layers)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRETER, reason="this process already is the interpreter run")
def test_triton_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "triton"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) == 6, res.stdout[-2000:]  # 4 shapes, strided views, compiled step


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_triton_kernel_matches_the_float64_loop(dtype, tol):
    q, keys, values, start, end = _attention_case(64, 14, 2, 300, 64, seed=0, dtype=dtype, device="cuda")
    out = decode_attention(q, keys, values, start, end, 0.125)
    want = attention_oracle(*(t.cpu() for t in (q, keys, values, start, end)), 0.125)
    assert_close(out.double().cpu(), want, rtol=tol, atol=tol)


@needs_cuda
def test_cuda_triton_kernel_with_float32_keys_and_bf16_values():
    """The cache of a step under bf16 autocast: float32 queries and keys, bf16 values."""
    q, keys, values, start, end = _attention_case(16, 14, 2, 200, 64, seed=1, device="cuda")
    out = decode_attention(q, keys, values.bfloat16(), start, end, 0.125)
    want = attention_oracle(*(t.cpu() for t in (q, keys, values.bfloat16().float(), start, end)), 0.125)
    assert out.dtype == torch.float32
    assert_close(out.double().cpu(), want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------
# the forward against Hugging Face's
# ----------------------------------------------------------------------------------------
def _model(family: str, **extra):
    import transformers as tf

    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config)}[family]
    torch.manual_seed(0)
    config = cfg(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, **extra)
    return cls(config).double().eval()


def _decode_against_full_forward(lm, steps=5, lengths=(7, 4, 2, 1), capacity=20):
    """Prefill left-padded prompts with `lm` itself, copy its cache into static [B, H_kv, C, D]
    buffers, then run `steps` decode steps of DecodeForward; returns the largest difference from
    the logits of `lm`'s forward over the whole sequence at the same positions."""
    gen = torch.Generator().manual_seed(1)
    b, p = len(lengths), max(lengths)
    ids = torch.randint(1, lm.config.vocab_size, (b, p + steps), generator=gen)
    mask = torch.ones(b, p + steps, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, : p - n] = 0
        ids[i, : p - n] = 0
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [B, P + steps, V]
        cache = lm(input_ids=ids[:, :p], attention_mask=mask[:, :p], position_ids=pos[:, :p],
                   use_cache=True)[cache_argument(lm)]
        layers = []
        for layer in cache.layers:
            k = torch.zeros(b, layer.keys.shape[1], capacity, layer.keys.shape[3], dtype=layer.keys.dtype)
            v = torch.full_like(k, 1e4)  # unwritten columns hold garbage: they must not be read
            k[:, :, :p], v[:, :, :p] = layer.keys, layer.values
            layers.append(SimpleNamespace(keys=k, values=v))
        step = DecodeForward(lm)
        start = torch.tensor([p - n for n in lengths])
        worst = 0.0
        for t in range(steps):
            at = p + t
            logits = step(ids[:, at: at + 1], pos[:, at: at + 1], layers, torch.tensor([at]), start)
            assert logits.shape == (b, lm.config.vocab_size) and logits.dtype == torch.float64
            worst = max(worst, (logits - full[:, at]).abs().max().item())
    return worst


@pytest.mark.parametrize("family,extra", [
    ("qwen2", {}),
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=12)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    ("qwen3", dict(head_dim=16)),
])
def test_logits_equal_the_model_forward_in_float64(family, extra):
    assert _decode_against_full_forward(_model(family, **extra)) < 1e-12


def test_with_a_lora_adapter_on_and_off():
    from r1train.model.lora import adapters_disabled, apply_lora, lora_layers

    lm = _model("qwen2")
    base = _decode_against_full_forward(lm)
    apply_lora(lm, rank=4, alpha=8.0)
    for _, layer in lora_layers(lm):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)  # B = 0 would make the adapter invisible
    lm.double()
    assert _decode_against_full_forward(lm) < 1e-12
    with adapters_disabled(lm):
        assert _decode_against_full_forward(lm) < 1e-12
    assert base < 1e-12


def test_unsupported_models_are_named():
    import transformers as tf

    sliding = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "layer 0 uses sliding-window attention" in unsupported(sliding)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported(gpt2)
    with pytest.raises(ValueError, match="DecodeForward: model_type 'gpt2'"):
        DecodeForward(gpt2)
    assert unsupported(_model("llama")) is None


def test_one_graph_under_torch_compile():
    """The step traces into one graph (`fullgraph=True`: no break, which CUDA graphs need) and
    computes what it computes uncompiled, its in-place cache writes included. The CPU run uses
    the eager attention; a GPU run traces the Triton kernel (bench/gpu_suite.py)."""
    lm = _model("qwen2").float()
    gen = torch.Generator().manual_seed(2)

    def cache():
        g = torch.Generator().manual_seed(3)
        return [SimpleNamespace(keys=torch.randn(3, 2, 16, 8, generator=g),
                                values=torch.randn(3, 2, 16, 8, generator=g)) for _ in lm.model.layers]

    ids = torch.randint(0, 97, (3, 1), generator=gen)
    args = (torch.tensor([[9], [4], [0]]), torch.tensor([9]), torch.tensor([0, 5, 9]))
    step = DecodeForward(lm)
    eager_cache, compiled_cache = cache(), cache()
    with torch.no_grad():
        want = step(ids, args[0], eager_cache, args[1], args[2])
        got = torch.compile(step.__call__, backend="aot_eager", fullgraph=True)(ids, args[0], compiled_cache,
                                                                                 args[1], args[2])
    assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(eager_cache, compiled_cache):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(eager_cache[0].keys, cache()[0].keys)  # the step wrote its key


def test_the_cpu_bench_runs(capsys):
    """bench/bench_decode.py (the CPU table of bench/RESULTS.md) on the tests' tiny model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--rows", "3", "--new", "4", "--repeats", "1", "--device", "cpu"])
    table = capsys.readouterr().out
    for row in ("eager engine", "static, decode-only forward (eager)", "static, HF forward (eager)"):
        assert f"| {row} | " in table, row
