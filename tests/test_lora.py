"""LoRA (model/lora.py) against a float64 transcription of its equation, y = W x + b + s B A x with
s = alpha / r (LoRA Sec. 4.1) or alpha / sqrt(r) (rsLoRA), and on the tiny model: step 0, adapters
off and unmerged are the base model bit for bit, only A and B train, PEFT's names."""
import math

import pytest
import torch
from torch import nn

from r1train.model.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    peft_adapter_config,
    unmerge_lora,
)

# A layer with in=2, out=1 and r=4, every value chosen so the sums are worked out by hand.
W, BIAS, A, B = [[1.0, 2.0]], [0.5], [[1.0, 1.0]] * 4, [[1.0, 1.0, 1.0, 1.0]]


def _layer(w, b, a, bb, rank, alpha, rslora=False, dtype=torch.float64) -> LoRALinear:
    base = nn.Linear(len(w[0]), len(w), dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(w))
        base.bias.copy_(torch.tensor(b))
    layer = LoRALinear(base, rank=rank, alpha=alpha, rslora=rslora)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor(a))
        layer.lora_B.weight.copy_(torch.tensor(bb))
    return layer


@pytest.mark.parametrize("rslora, expected", [
    (False, 19.5),  # W x + b = 1 + 2 + 0.5 = 3.5; A x = [2, 2, 2, 2]; B A x = 8; s = 8 / 4 = 2: 3.5 + 16
    (True, 35.5),   # s = 8 / sqrt(4) = 4: 3.5 + 32
])
def test_hand_worked_case(rslora, expected):
    layer = _layer(W, BIAS, A, B, rank=4, alpha=8, rslora=rslora)
    assert layer(torch.tensor([[1.0, 1.0]], dtype=torch.float64)).item() == expected


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_against_the_equation(rslora):
    torch.manual_seed(0)
    n, d_in, d_out, r, alpha = 7, 6, 5, 3, 4.0
    layer = _layer(torch.randn(d_out, d_in).tolist(), torch.randn(d_out).tolist(), torch.randn(r, d_in).tolist(),
                   torch.randn(d_out, r).tolist(), rank=r, alpha=alpha, rslora=rslora)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)  # [N, in]
    g = torch.randn(n, d_out, dtype=torch.float64)  # [N, out], dL/dy of L = sum(g * y)
    xd, w, b = x.detach(), layer.weight.detach(), layer.bias.detach()
    a, bb = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    s = alpha / math.sqrt(r) if rslora else alpha / r
    # y_ni = sum_j W_ij x_nj + b_i + s sum_k B_ik sum_j A_kj x_nj, one element at a time.
    expected = torch.tensor([[sum(w[i, j] * xd[n_, j] for j in range(d_in)) + b[i]
                              + s * sum(bb[i, k] * sum(a[k, j] * xd[n_, j] for j in range(d_in)) for k in range(r))
                              for i in range(d_out)] for n_ in range(n)], dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    # dL/dB = s g^T (x A^T), dL/dA = s (g B)^T x, dL/dx = g W + s (g B) A; W and b frozen by apply_lora only.
    torch.testing.assert_close(layer.lora_B.weight.grad, s * g.T @ (xd @ a.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * (g @ bb).T @ xd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ w + s * (g @ bb) @ a, rtol=1e-12, atol=1e-12)


def test_init_adopts_the_base_weight_and_starts_at_zero():
    torch.manual_seed(0)
    base = nn.Linear(64, 32, bias=False, dtype=torch.float64)
    layer = LoRALinear(base, rank=8, alpha=16)
    assert layer.weight is base.weight and layer.bias is None and isinstance(layer, nn.Linear)
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (32, 8)
    assert layer.lora_A.weight.dtype == torch.float64
    a = layer.lora_A.weight
    # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), here +-0.125.
    assert a.abs().max() <= 1 / math.sqrt(64) and a.abs().max() > 0.1 and a.std() > 0.05
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 8, dtype=torch.float64))
    assert set(layer.state_dict()) == {"weight", "lora_A.weight", "lora_B.weight"}


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    layer = _layer(torch.randn(4, 6).tolist(), [0.0] * 4, torch.randn(2, 6).tolist(), torch.randn(4, 2).tolist(),
                   rank=2, alpha=2)
    plain = layer(x := torch.randn(3, 6, dtype=torch.float64))
    layer.lora_dropout = nn.Dropout(0.5)
    assert torch.equal(layer.eval()(x), plain)
    assert not torch.equal(layer.train()(x), plain)


# The tiny model

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from r1train.data.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_lora") / "model", seed=0)


def _load(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids():
    return torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def _randomise_b(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@torch.no_grad()
def test_step_zero_and_adapters_off_are_the_base_model_bit_for_bit(tiny_path):
    model, ids = _load(tiny_path), _ids()
    base = model(ids).logits
    names = apply_lora(model, rank=4, alpha=8)
    assert len(names) == 4 * 7 and names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert torch.equal(model(ids).logits, base)  # B = 0
    _randomise_b(model)
    assert not torch.allclose(model(ids).logits, base)
    with adapters_disabled(model):
        assert torch.equal(model(ids).logits, base)
    assert not torch.allclose(model(ids).logits, base)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@torch.no_grad()
def test_merge_equals_the_adapter_and_unmerge_restores_the_bits(tiny_path, dtype, tol):
    model, ids = _load(tiny_path, dtype), _ids()
    apply_lora(model, rank=4, alpha=8, rslora=dtype == torch.float64)
    _randomise_b(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = model(ids).logits
    merge_lora(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_proj.weight, weights["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(model(ids).logits, adapted, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with adapters_disabled(model):
            pass
    unmerge_lora(model)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, adapted)


def test_only_the_adapters_train(tiny_path):
    model, ids = _load(tiny_path), _ids()
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == 4 * 2 * 2
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # at step 0 B = 0 gives A no gradient; the second step moves A too
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)
        optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if "lora_" not in k)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"),
    (dict(alpha=math.inf), "alpha"), (dict(alpha=math.nan), "alpha"), (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"), (dict(targets="q_proj"), "targets"), (dict(targets=[]), "targets"),
])
def test_bad_arguments_are_refused_by_name(tiny_path, kwargs, name):
    model = _load(tiny_path)
    with pytest.raises(ValueError, match=name):
        apply_lora(model, **{"rank": 4, "alpha": 8.0, **kwargs})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_target_that_matches_nothing_lists_the_layer_names(tiny_path):
    model = _load(tiny_path)
    with pytest.raises(ValueError) as err:
        apply_lora(model, rank=4, alpha=8, targets=["q_proj", "qkv_proj"])
    assert "'qkv_proj'" in str(err.value) and "'q_proj'" not in str(err.value)
    assert str(err.value).endswith("named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    apply_lora(model, rank=4, alpha=8, targets=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8, targets=["v_proj"])


def test_peft_key_names_and_adapter_config(tiny_path):
    model = _load(tiny_path)
    apply_lora(model, rank=4, alpha=16, dropout=0.05, rslora=True)
    state = lora_state_dict(model)
    assert len(state) == 4 * 7 * 2
    q_a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    k_b = state["base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"]
    assert q_a.shape == (4, 128) and k_b.shape == (64, 4)  # k_proj: 2 kv heads of 32
    assert q_a.data_ptr() == model.model.layers[0].self_attn.q_proj.lora_A.weight.data_ptr()
    assert peft_adapter_config(model, "tiny") == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": 4, "lora_alpha": 16,
        "lora_dropout": 0.05, "use_rslora": True, "bias": "none",
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    # One layer's q_proj only: "q_proj" would name all four to PEFT, so the full name is written.
    one = _load(tiny_path)
    apply_lora(one, rank=2, alpha=2, targets=["model.layers.1.self_attn.q_proj"])
    assert peft_adapter_config(one)["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert list(lora_state_dict(one)) == ["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                                          "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]


def test_generation_few_row_form_keeps_the_adapter(monkeypatch):
    """float64: inside the engine's `few_row_linears` a LoRALinear computes its base product
    W x + b in the few-row form and still adds s B A x (and nothing when adapters are off), as
    outside it; the swapped `base_forward` is restored on exit."""
    import r1train.model.engine as engine

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(300, 400, dtype=torch.float64), rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    model = nn.Sequential(layer)
    x = torch.randn(3, 1, 300, dtype=torch.float64)
    want, base = model(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    calls = []
    forward = engine._few_row_forward
    monkeypatch.setattr(engine, "_few_row_forward", lambda self, x: calls.append(1) or forward(self, x))
    with engine.few_row_linears(model) as patched:
        assert patched == [layer] and "forward" not in layer.__dict__
        got = model(x)
        with adapters_disabled(model):
            off = model(x)
    assert calls == [1, 1] and "base_forward" not in layer.__dict__
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(off, base, rtol=1e-12, atol=1e-12)
    assert (want - base).abs().max() > 1e-3
