"""silu_mul and fuse_swiglu (r1train/model/mlp.py): SwiGLU's product saving g and u only.

Its gradients against a float64 transcription of the formulas and, bit for bit, against
autograd of the plain expression; the patched model's logits and gradients equal the unpatched
model's bit for bit; what autograd keeps shrinks by exactly one [tokens, intermediate] tensor per
layer; MLPs that are not SiLU-gated keep their own forward."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from r1train.model.mlp import _SiluMul, fuse_swiglu, silu_mul


def _pair(shape=(3, 5, 8), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    return g, u


def test_gradients_against_the_formula_in_float64():
    """d/du = grad silu(g), d/dg = grad u (s + g s (1 - s)), written out element by element."""
    g, u = _pair()
    grad = torch.randn(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    d_g, d_u = torch.autograd.grad(silu_mul(g, u), (g, u), grad)
    for gi, ui, wi, dgi, dui in zip(g.flatten().tolist(), u.flatten().tolist(), grad.flatten().tolist(),
                                    d_g.flatten().tolist(), d_u.flatten().tolist()):
        s = 1 / (1 + math.exp(-gi))
        assert dui == pytest.approx(wi * gi * s, rel=1e-12, abs=1e-14)
        assert dgi == pytest.approx(wi * ui * (s + gi * s * (1 - s)), rel=1e-12, abs=1e-14)
    assert torch.autograd.gradcheck(_SiluMul.apply, _pair((2, 3)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_matches_autograd_of_the_plain_expression(dtype, tol):
    """Forward and gradients equal autograd's of silu(g) * u bit for bit, and the float64
    oracle's within the dtype's rounding."""
    g, u = _pair(dtype=dtype, seed=1)
    out = silu_mul(g, u)
    plain = F.silu(g) * u
    assert torch.equal(out, plain)
    grad = torch.randn(g.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(out, (g, u), grad)
    for a, b in zip(got, torch.autograd.grad(plain, (g, u), grad)):
        assert a.dtype == dtype and torch.equal(a, b)
    g64, u64 = (t.detach().double().requires_grad_() for t in (g, u))
    want = torch.autograd.grad(F.silu(g64) * u64, (g64, u64), grad.double())
    for a, b in zip(got, want):
        assert_close(a.double(), b, rtol=tol, atol=tol)


def test_one_input_without_gradient():
    g, u = _pair(dtype=torch.float32, seed=6)
    frozen = u.detach()
    (d_g,) = torch.autograd.grad(silu_mul(g, frozen).sum(), g)
    (want,) = torch.autograd.grad((F.silu(g) * frozen).sum(), g)
    assert torch.equal(d_g, want)


def test_without_gradients_it_is_the_plain_expression():
    g, u = _pair(dtype=torch.float32, seed=3)
    with torch.no_grad():
        assert silu_mul(g, u).grad_fn is None
        assert torch.equal(silu_mul(g, u), F.silu(g) * u)


def _llama(hidden_act="silu"):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act)
    return tf.LlamaForCausalLM(config).eval()


def _saved_bytes(lm, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(input_ids=ids).logits.sum()
    return sum(seen.values())


def test_fused_model_same_logits_same_gradients_one_tensor_less_kept():
    plain, fused = _llama(), _llama()
    assert fuse_swiglu(fused) == 3
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    out_plain, out_fused = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.equal(out_plain, out_fused)
    out_plain.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        assert torch.equal(b.grad, a.grad), name
    # One [tokens, intermediate] float32 tensor (silu's output) less per layer.
    assert _saved_bytes(plain, ids) - _saved_bytes(fused, ids) == 3 * 2 * 11 * 48 * 4


def test_other_activations_keep_their_forward():
    lm = _llama(hidden_act="gelu")
    assert fuse_swiglu(lm) == 0
    assert all("forward" not in vars(m) for m in lm.modules())


def test_load_causal_lm_fuses(tmp_path):
    from r1train.model.load import load_causal_lm

    _llama().save_pretrained(tmp_path)
    lm = load_causal_lm(str(tmp_path), device=torch.device("cpu"))
    assert sum("forward" in vars(m) for m in lm.modules()) == 3
