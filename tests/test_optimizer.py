"""The trainers' optimizer (`r1train.run.optim.build_optimizer`) against AdamW written out in float64:
decoupled weight decay on matrices only, bias-corrected moments (Loshchilov & Hutter, Alg. 2,
with PyTorch's placement of eps outside the square root)."""
import torch

from r1train.run.optim import build_optimizer


def _adamw_reference(p, grads, lr, betas, eps, weight_decay):
    """p after one AdamW step per gradient in `grads`, float64, step by step."""
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)  # decoupled decay, before the moment step
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_steps_equal_the_formula_with_decay_on_matrices_only():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    start = [weight.detach().clone(), bias.detach().clone()]
    lr, betas, wd = 1e-2, (0.9, 0.99), 0.1
    opt = build_optimizer([weight, bias], lr, wd, betas)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in (weight, bias)] for _ in range(3)]
    for g_w, g_b in grads:
        weight.grad, bias.grad = g_w.clone(), g_b.clone()
        opt.step()
    want_w = _adamw_reference(start[0], [g[0] for g in grads], lr, betas, 1e-8, wd)
    want_b = _adamw_reference(start[1], [g[1] for g in grads], lr, betas, 1e-8, 0.0)  # a vector: no decay
    torch.testing.assert_close(weight.detach(), want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias.detach(), want_b, rtol=1e-12, atol=1e-12)


def test_fused_on_cpu_and_the_default_elsewhere():
    cpu = build_optimizer([torch.nn.Parameter(torch.ones(2, 2))], 1e-3, 0.0, (0.9, 0.99))
    assert cpu.defaults["fused"] is True
    meta = build_optimizer([torch.nn.Parameter(torch.ones(2, 2, device="meta"))], 1e-3, 0.0, (0.9, 0.99))
    assert not meta.defaults["fused"]  # PyTorch's own choice (None) where no fused kernel exists
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = build_optimizer([torch.nn.Parameter(torch.ones(2, 2)), frozen], 1e-3, 0.0, (0.9, 0.99))
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])
