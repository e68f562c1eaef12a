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

from r1train.kernels import eager_linear_logprobs, fused_linear_logprobs, token_logprobs
from r1train.kernels.logprobs import (
    resolve_impl,
    tile_shape,
    torch_linear_logprobs,
    torch_token_logprobs,
)


def _interpreter_from_start() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from r1train.kernels.triton_logprobs import INTERPRETED
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
    g_lp = torch.randn(N, generator=gen, dtype=torch.float64, device=gen.device)
    g_ent = torch.randn(N, generator=gen, dtype=torch.float64, device=gen.device)
    g_lp[[0, 3]] = 0.0
    g_ent[[3, 5]] = 0.0
    return g_lp, g_ent


def _ragged_logits(N: int, V: int, gen: torch.Generator) -> torch.Tensor:
    """float32 logits with rows shifted by +100, -100 or 0 (log-softmax must not care)."""
    offset = torch.tensor([100.0, -100.0, 0.0]).repeat(N)[:N]
    return (2 * torch.randn(N, V, generator=gen) + offset[:, None]).float()


def _compare(fn, inputs: list[torch.Tensor], ref_fn, with_entropy: bool, seed: int = 0,
             grad_rtol: float | None = None):
    """fn(*inputs) vs ref_fn(*inputs in float64): values, entropies and input gradients.

    Values always to 1e-5: the kernels compute in float32 whatever the input dtype, and the
    float64 reference starts from the same (already rounded) inputs. Gradients come back in
    the input dtype, so 16-bit inputs pass `grad_rtol`, a few units of their rounding, also
    taken as the absolute tolerance relative to each gradient's largest entry.
    """
    gen = torch.Generator(device=inputs[0].device).manual_seed(seed)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    out, ref = fn(*xs, with_entropy), ref_fn(*x64)
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
    for a, b in zip(xs, x64):
        assert a.grad.dtype == a.dtype
        tol = TOL if grad_rtol is None else dict(rtol=grad_rtol,
                                                 atol=grad_rtol * b.grad.abs().max().item())
        assert_close(a.grad.double(), b.grad, **tol)


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
    from r1train.kernels.triton_logprobs import triton_token_logprobs

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
    from r1train.kernels.triton_logprobs import triton_linear_logprobs

    gen = torch.Generator().manual_seed(N * H + V)
    hidden, weight, y = _ragged_linear(N, H, V, gen)
    fn = lambda h, w, e: triton_linear_logprobs(  # noqa: E731
        h, w, y, temperature, e, blocks=(16, 32, 16), num_splits=num_splits,
        rows_per_chunk=rows_per_chunk)
    _compare(fn, [hidden, weight], lambda h, w: reference(h @ w.T, y, temperature),
             with_entropy)


# float16 takes the code path that bfloat16 takes on a GPU: 16-bit loads, and the logit and
# weight gradients kept in the input dtype. Gradient tolerances are two units of rounding,
# 2 * 2^-11 for float16 and 2 * 2^-8 for bfloat16. bfloat16 runs the token kernel only here:
# the interpreter's tl.dot is wrong for bfloat16 operands (triton 3.9: a 16x16 product came
# back 2.5e10 off, while float16 and float32 were exact), so the fused kernel's bfloat16 run
# is left to the CUDA tests below.
GRAD_RTOL_16 = {torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


class _RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the gradient to `dtype`: the fused kernels' 16-bit
    contract, which (like eager bfloat16 autograd) rounds d loss / d logits to the input dtype
    before the grad_hidden and grad_weight reductions. A float64 reference without this step
    differs by u * sum_j |dx_j| |w_j|, far above u * |grad| where the exact sum cancels."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def _linear_reference_16bit(y, temperature, dtype):
    return lambda h, w: reference(_RoundGrad.apply(h @ w.T, dtype), y, temperature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
@needs_interpreter
def test_triton_token_kernel_16bit(dtype, with_entropy):
    from r1train.kernels.triton_logprobs import triton_token_logprobs

    gen = torch.Generator().manual_seed(17)
    logits = _ragged_logits(9, 37, gen).to(dtype)
    y = torch.randint(0, 37, (9,), generator=gen)
    _compare(lambda x, e: triton_token_logprobs(x, y, 0.7, e, block_v=16), [logits],
             lambda x: reference(x, y, 0.7), with_entropy, grad_rtol=GRAD_RTOL_16[dtype])


@pytest.mark.parametrize("with_entropy", [False, True])
@needs_interpreter
def test_triton_fused_kernel_float16(with_entropy):
    from r1train.kernels.triton_logprobs import triton_linear_logprobs

    gen = torch.Generator().manual_seed(19)
    hidden, weight, y = _ragged_linear(9, 17, 70, gen)  # exact in float16 too
    fn = lambda h, w, e: triton_linear_logprobs(  # noqa: E731
        h, w, y, 0.7, e, blocks=(16, 32, 16), num_splits=2, rows_per_chunk=4)
    _compare(fn, [hidden.half(), weight.half()], _linear_reference_16bit(y, 0.7, torch.float16),
             with_entropy, grad_rtol=GRAD_RTOL_16[torch.float16])


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


# ----------------------------------------------------------------------------------------
# compiled Triton kernels on a GPU (skipped without one; CI has none)
# ----------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER,
                                reason="needs a CUDA GPU (compiled Triton)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_cuda_triton_kernels_match_float64(dtype, temperature, with_entropy):
    """The kernels as a GPU runs them: default blocks and splits, V = 5003 (ragged against
    every block), N = 300 (ragged against BLOCK_N), a backward in three chunks. The inputs
    are exact in every dtype (`_ragged_linear`), so values still match float64 to 1e-5."""
    from r1train.kernels.triton_logprobs import triton_linear_logprobs, triton_token_logprobs

    gen = torch.Generator().manual_seed(23)
    hidden, weight, y = _ragged_linear(300, 256, 5003, gen)
    hidden, weight, y = hidden.cuda().to(dtype), weight.cuda().to(dtype), y.cuda()
    rtol = GRAD_RTOL_16.get(dtype)  # None for float32: the 1e-5 of the CPU tests
    ref_fn = _linear_reference_16bit(y, temperature, dtype) if rtol else \
        (lambda h, w: reference(h @ w.T, y, temperature))
    _compare(lambda h, w, e: triton_linear_logprobs(h, w, y, temperature, e, rows_per_chunk=128),
             [hidden, weight], ref_fn, with_entropy, grad_rtol=rtol)
    logits = _ragged_logits(300, 5003, gen).cuda().to(dtype)
    _compare(lambda x, e: triton_token_logprobs(x, y, temperature, e), [logits],
             lambda x: reference(x, y, temperature), with_entropy, grad_rtol=rtol)


@needs_cuda
def test_cuda_public_dispatch_picks_triton():
    gen = torch.Generator().manual_seed(29)
    hidden, weight, y = _ragged_linear(257, 128, 3001, gen)
    hidden, weight, y = hidden.cuda().bfloat16(), weight.cuda().bfloat16(), y.cuda()
    out = fused_linear_logprobs(hidden, weight.requires_grad_(), y, 0.7)  # no impl given
    assert "Triton" in type(out.grad_fn).__name__ and out.dtype == torch.float32
    # float32 accumulation, never rounded to bfloat16 (the chunked path rounds its logits)
    assert_close(out.double(), reference(hidden.double() @ weight.double().T, y, 0.7)[0], **TOL)


@needs_cuda
def test_cuda_token_kernel_past_int32_offsets():
    """N * V > 2^31 - 1 elements: row offsets need int64, or the last rows read the wrong
    memory. The rows checked sit past the int32 limit."""
    N, V = 14_200, 151_936  # 2.16e9 elements, 4.3 GB in bfloat16 (8.6 GB with the gradient)
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(31)
    x = torch.randn(N, V, generator=gen, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=gen, device="cuda")
    rows = torch.tensor([0, N // 2, N - 2, N - 1], device="cuda")
    assert int(rows[-1]) * V > 2**31
    x.requires_grad_()
    logp = token_logprobs(x, y, 0.7, impl="triton")
    x64 = x.detach()[rows].double().requires_grad_()
    ref = reference(x64, y[rows], 0.7)[0]
    assert_close(logp[rows].double(), ref, **TOL)
    g = torch.zeros(N, device="cuda")
    g[rows] = torch.tensor([1.0, -2.0, 0.5, 3.0], device="cuda")
    logp.backward(g)
    ref.backward(g[rows].double())
    rtol = GRAD_RTOL_16[torch.bfloat16]
    assert_close(x.grad[rows].double(), x64.grad, rtol=rtol,
                 atol=rtol * x64.grad.abs().max().item())
    assert int(torch.count_nonzero(x.grad[N - 3])) == 0  # a row with no upstream gradient


@pytest.mark.skipif(INTERPRETER, reason="this process already is the interpreter run")
def test_triton_tests_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("R1_LOGPROB_IMPL", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "triton"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    # every Triton test ran: 2 hand-derived + 8 token-kernel + 12 fused-kernel + 4 + 2
    # 16-bit + 1 dispatch (the CUDA tests are skipped on a machine without a GPU)
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) == 29, res.stdout[-2000:]


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


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under autocast, float32 hidden states and weight are cast as F.linear would cast them,
    and gradients reach the float32 leaves in float32."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = (torch.randn(40, 16, generator=gen) / 4).requires_grad_()
    y = torch.randint(0, 40, (6,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_logprobs(h, w, y, 0.7, impl="torch")
    expected = eager_linear_logprobs(h.bfloat16(), w.bfloat16(), y, 0.7)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - fused_linear_logprobs(h, w, y, 0.7)).abs().max() > 1e-4  # bf16 was used
    out.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


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
