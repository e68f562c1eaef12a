"""Per-token log-prob kernels against a float64 transcription of the formulas.

Triton kernels run on CPU tensors through the interpreter (float32, small ragged shapes). The
installed triton (3.x) reads TRITON_INTERPRET when `@triton.jit` wraps a function, and wraps
`triton.language`'s own helpers (tl.sum, tl.max) when it is imported; in a whole-suite run
something may have imported triton long before this module. So the Triton tests run here only
when the interpreter was on from the start, and otherwise
`test_triton_tests_under_interpreter` reruns them in a child pytest with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from kernels import eager_linear_logprobs, fused_linear_logprobs, token_logprobs
from kernels.logprobs import (
    resolve_impl,
    tile_shape,
    torch_linear_logprobs,
    torch_token_logprobs,
)


def _interpreter_from_start() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from kernels.triton_logprobs import INTERPRETED
    except ImportError:  # no triton on this platform
        return False
    return INTERPRETED


INTERPRETER = _interpreter_from_start()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="run by test_triton_tests_under_interpreter in a child process")
ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """float64 log p_y = z_y - lse(z) and H = lse(z) - sum_j p_j z_j, z = logits / T."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    p = torch.exp(z - lse[:, None])
    return logp, lse - (p * z).sum(-1)


def _upstream(N: int, gen: torch.Generator):
    """Non-uniform upstream gradients; row 3 has none at all, rows 0 and 5 only one of two."""
    g_lp = torch.randn(N, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(N, generator=gen, dtype=torch.float64)
    g_lp[[0, 3]] = 0.0
    g_ent[[3, 5]] = 0.0
    return g_lp, g_ent


def _ragged_logits(N: int, V: int, gen: torch.Generator) -> torch.Tensor:
    """float32 logits with rows shifted by +100, -100 or 0 (log-softmax must not care)."""
    offset = torch.tensor([100.0, -100.0, 0.0]).repeat(N)[:N]
    return (2 * torch.randn(N, V, generator=gen) + offset[:, None]).float()


def _compare(fn, inputs32: list[torch.Tensor], ref_fn, with_entropy: bool, seed: int = 0):
    """fn(*inputs32) vs ref_fn(*inputs in float64): values, entropies and input gradients."""
    gen = torch.Generator().manual_seed(seed)
    x32 = [t.detach().clone().requires_grad_() for t in inputs32]
    x64 = [t.detach().double().requires_grad_() for t in inputs32]
    out, ref = fn(*x32, with_entropy), ref_fn(*x64)
    g_lp, g_ent = _upstream(ref[0].shape[0], gen)
    if with_entropy:
        assert_close(out[0].double(), ref[0], **TOL)
        assert_close(out[1].double(), ref[1], **TOL)
        loss = (out[0].double() * g_lp).sum() + (out[1].double() * g_ent).sum()
        loss_ref = (ref[0] * g_lp).sum() + (ref[1] * g_ent).sum()
    else:
        assert_close(out.double(), ref[0], **TOL)
        loss, loss_ref = (out.double() * g_lp).sum(), (ref[0] * g_lp).sum()
    loss.backward()
    loss_ref.backward()
    for a, b in zip(x32, x64):
        assert_close(a.grad.double(), b.grad, **TOL)


# ----------------------------------------------------------------------------------------
# hand-derived case
# ----------------------------------------------------------------------------------------
# logits x = [0, ln(3)/2] at T = 0.5 give z = [0, ln 3], p = [1/4, 3/4]; target 0:
#   log p_0 = ln(1/4) = -ln 4
#   H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3
#   d log p_0 / dx = (onehot - p) / T = [3/4, -3/4] * 2 = [3/2, -3/2]
#   dH/dx = -p (z - sum p z) / T with sum p z = (3/4) ln 3:
#         = [-(1/4)(-(3/4) ln 3), -(3/4)((1/4) ln 3)] * 2 = [(3/8) ln 3, -(3/8) ln 3]
# As a linear layer: h = [[1]], W = [[0], [ln(3)/2]] so x = h W^T; grad_W = dx^T h = dx and
# grad_h = dx W, e.g. d log p_0 / dh = (-3/2)(ln(3)/2) = -(3/4) ln 3.
LN3 = math.log(3.0)
HAND_LOGP, HAND_H = -math.log(4.0), math.log(4.0) - 0.75 * LN3
HAND_DLOGP_DX, HAND_DH_DX = [1.5, -1.5], [0.375 * LN3, -0.375 * LN3]


@pytest.mark.parametrize("impl",
                         ["torch", "eager", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_hand_derived_two_tokens(impl, which):
    x = torch.tensor([[0.0, LN3 / 2]], requires_grad=True)
    y = torch.tensor([0])
    logp, ent = token_logprobs(x, y, temperature=0.5, return_entropy=True, impl=impl)
    assert_close(logp, torch.tensor([HAND_LOGP]), atol=1e-6, rtol=0)
    assert_close(ent, torch.tensor([HAND_H]), atol=1e-6, rtol=0)
    (logp if which == "logp" else ent).sum().backward()
    expected = HAND_DLOGP_DX if which == "logp" else HAND_DH_DX
    assert_close(x.grad, torch.tensor([expected]), atol=1e-6, rtol=0)

    h = torch.tensor([[1.0]], requires_grad=True)
    W = torch.tensor([[0.0], [LN3 / 2]], requires_grad=True)
    logp, ent = fused_linear_logprobs(h, W, y, temperature=0.5, return_entropy=True, impl=impl)
    assert_close(logp, torch.tensor([HAND_LOGP]), atol=1e-6, rtol=0)
    (logp if which == "logp" else ent).sum().backward()
    assert_close(W.grad, torch.tensor(expected)[:, None], atol=1e-6, rtol=0)
    assert_close(h.grad, torch.tensor([[expected[1] * LN3 / 2]]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,V,block_v", [(7, 100, 32), (9, 37, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@needs_interpreter
def test_triton_token_kernel_matches_float64(N, V, block_v, temperature,
                                             with_entropy):
    from kernels.triton_logprobs import triton_token_logprobs

    gen = torch.Generator().manual_seed(N * V)
    logits = _ragged_logits(N, V, gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[1] = V - 1  # a target in the masked tail block
    _compare(lambda x, e: triton_token_logprobs(x, y, temperature, e, block_v=block_v),
             [logits], lambda x: reference(x, y, temperature), with_entropy)


@pytest.mark.parametrize("N,H,V,num_splits,rows_per_chunk",
                         [(7, 40, 100, 3, 5), (13, 24, 50, 1, 16), (9, 17, 70, 2, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@needs_interpreter
def test_triton_fused_kernel_matches_float64(N, H, V, num_splits, rows_per_chunk,
                                             temperature, with_entropy):
    from kernels.triton_logprobs import triton_linear_logprobs

    gen = torch.Generator().manual_seed(N * H + V)
    hidden, weight, y = _ragged_linear(N, H, V, gen)
    fn = lambda h, w, e: triton_linear_logprobs(  # noqa: E731
        h, w, y, temperature, e, blocks=(16, 32, 16), num_splits=num_splits,
        rows_per_chunk=rows_per_chunk)
    _compare(fn, [hidden, weight], lambda h, w: reference(h @ w.T, y, temperature),
             with_entropy)


def _ragged_linear(N: int, H: int, V: int, gen: torch.Generator):
    """hidden's last feature is +100, -100 or 0 and weight's last column is 1, so each row's
    logits move by that offset. Entries are multiples of 1/8 and 1/16 of moderate size: every
    product and partial sum of hidden @ weight^T is then exact in float32 in any order, and
    the comparison with float64 measures the kernels' softmax arithmetic, not the matmul's
    rounding at logits of ~100 (already ~1e-5 there)."""
    hidden = torch.round(8 * torch.randn(N, H, generator=gen)) / 8
    weight = torch.round(16 * torch.randn(V, H, generator=gen) / math.sqrt(H)) / 16
    hidden[:, -1] = torch.tensor([100.0, -100.0, 0.0]).repeat(N)[:N]
    weight[:, -1] = 1.0
    y = torch.randint(0, V, (N,), generator=gen)
    y[1] = V - 1
    return hidden, weight, y


@needs_interpreter
def test_triton_public_dispatch_and_forward_only():
    """impl='triton' with default blocks; the no-grad path equals the autograd path's value
    and builds no graph."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight, y = _ragged_linear(5, 24, 300, gen)
    ref_logp, ref_ent = reference(hidden @ weight.T, y, 0.7)
    with torch.no_grad():
        logp, ent = fused_linear_logprobs(hidden, weight, y, 0.7, True, impl="triton")
    assert logp.grad_fn is None and logp.dtype == torch.float32
    assert_close(logp.double(), ref_logp, **TOL)
    assert_close(ent.double(), ref_ent, **TOL)
    w = weight.clone().requires_grad_()
    assert_close(fused_linear_logprobs(hidden, w, y, 0.7, impl="triton").double(), ref_logp,
                 **TOL)
    logits = _ragged_logits(5, 300, gen)
    assert_close(token_logprobs(logits, y, 0.7, impl="triton").double(),
                 reference(logits, y, 0.7)[0], **TOL)


@pytest.mark.skipif(INTERPRETER, reason="this process already is the interpreter run")
def test_triton_tests_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("R1_LOGPROB_IMPL", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "triton"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    # every Triton test ran: 2 hand-derived + 8 token-kernel + 12 fused-kernel + 1 dispatch
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) == 23, res.stdout[-2000:]


# ----------------------------------------------------------------------------------------
# chunked PyTorch path
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_torch_matches_float64(temperature, with_entropy):
    gen = torch.Generator().manual_seed(11)
    N, H, V = 11, 24, 150
    hidden, weight, y = _ragged_linear(N, H, V, gen)
    # 4 rows per chunk: two full chunks and a ragged one
    _compare(lambda h, w, e: torch_linear_logprobs(h, w, y, temperature, e, tiles=(4, 37)),
             [hidden, weight], lambda h, w: reference(h @ w.T, y, temperature), with_entropy)
    logits = _ragged_logits(N, V, gen)
    _compare(lambda x, e: torch_token_logprobs(x, y, temperature, e, tiles=(4, 37)),
             [logits], lambda x: reference(x, y, temperature), with_entropy)


def test_chunked_torch_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    N, H, V = 7, 5, 13
    h = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, V, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=gen)
    for e in (False, True):
        assert torch.autograd.gradcheck(
            lambda h, w: torch_linear_logprobs(h, w, y, 0.7, e, tiles=(3, 5)), (h, w))
        assert torch.autograd.gradcheck(
            lambda x: torch_token_logprobs(x, y, 0.7, e, tiles=(3, 5)), (x,))


def test_chunked_torch_saves_no_vocab_sized_tensor():
    """The memory bound: backward keeps inputs plus [N] statistics, never [N, V]; the same
    probe on the eager reference does see an [N, V] tensor."""
    N, H, V = 16, 8, 500
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))

    def largest_saved(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: torch_linear_logprobs(h, w, y, 1.0, True)) == V * H
    assert largest_saved(lambda: eager_linear_logprobs(h, w, y, 1.0, True)) >= N * V


def test_tile_shape_from_budget():
    # 2 live float32 tiles of 2048 tokens in 128 MiB: 134,217,728 / (2 * 2048 * 4) = 8192
    assert tile_shape(2048, 151_936, 128 * 2**20, 4) == (2048, 8192)
    # at most TOKEN_BLOCK = 4096 tokens: 134,217,728 / (2 * 4096 * 4) = 4096 entries
    assert tile_shape(10**6, 151_936, 128 * 2**20, 4) == (4096, 4096)
    # a small problem is one tile
    assert tile_shape(64, 1000, 128 * 2**20, 4) == (64, 1000)


def test_bf16_inputs_give_float32_and_leading_dims():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 16, generator=gen).bfloat16()
    w = (torch.randn(40, 16, generator=gen) / 4).bfloat16()
    y = torch.randint(0, 40, (2, 3), generator=gen)
    out = fused_linear_logprobs(h, w, y, 0.7, impl="torch")
    assert out.shape == (2, 3) and out.dtype == torch.float32
    # both paths round the bf16 matmul output the same way, then work in float32
    expected = eager_linear_logprobs(h.reshape(6, 16), w, y.reshape(6), 0.7).reshape(2, 3)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# dispatch and bad input
# ----------------------------------------------------------------------------------------
def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("R1_LOGPROB_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl(None, cpu) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_impl("triton", cpu)
    monkeypatch.setenv("R1_LOGPROB_IMPL", "eager")
    assert resolve_impl(None, cpu) == "eager"
    assert resolve_impl("torch", cpu) == "torch"  # the argument beats the variable
    h, w, y = torch.randn(3, 4), torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 5])
    assert "Chunked" not in type(fused_linear_logprobs(h, w, y).grad_fn).__name__  # eager
    monkeypatch.setenv("R1_LOGPROB_IMPL", "cuda")
    with pytest.raises(ValueError, match="R1_LOGPROB_IMPL.*'cuda'"):
        resolve_impl(None, cpu)
    monkeypatch.delenv("R1_LOGPROB_IMPL")
    assert "Chunked" in type(fused_linear_logprobs(h, w, y).grad_fn).__name__


def test_bad_inputs_raise_value_error():
    h, w, y = torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 5])
    with pytest.raises(ValueError, match="temperature.*0"):
        fused_linear_logprobs(h, w, y, temperature=0)
    with pytest.raises(ValueError, match=r"targets.*\[0, 6\).*6"):
        fused_linear_logprobs(h, w, torch.tensor([0, 1, 6]))
    with pytest.raises(ValueError, match=r"targets.*-1"):
        token_logprobs(torch.randn(3, 6), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"hidden.*weight.*\(6, 5\)"):
        fused_linear_logprobs(h, torch.randn(6, 5), y)
    with pytest.raises(ValueError, match=r"targets.*\(2,\)"):
        token_logprobs(torch.randn(3, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="impl.*'fast'"):
        token_logprobs(torch.randn(3, 6), y, impl="fast")
    with pytest.raises(ValueError, match="targets.*float32"):
        token_logprobs(torch.randn(3, 6), y.float())


def test_benchmark_runs_on_cpu_at_tiny_size():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("R1_LOGPROB_IMPL", None)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_logprobs.py"), "--tiny",
                          "--no-compile"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("|")]
    for mode in ("fwd", "fwd+bwd"):
        for variant in ("eager", "chunked"):
            assert any(f"| {variant} " in r and f"| {mode} " in r for r in rows), res.stdout
    assert "chunked/eager" in res.stdout
