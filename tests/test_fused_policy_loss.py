"""kernels.fused_policy_loss against full logits + log_softmax + the same per-token loss."""

import pytest
import torch

from kernels.fused_policy_loss import fused_policy_loss
from tests.reference_losses import naive_policy_loss
from tests.test_fused_logprob import run_in_triton_interpreter


def _ppo_loss(n, with_entropy, seed=1):
    """PPO-clip per token with a fixed old policy (so some tokens clip), token-mean, and an entropy bonus."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=g) * 0.5 - 4.0
    adv = torch.randn(n, generator=g)

    def loss(logp, ent, rows):
        ratio = torch.exp(logp - old[rows])
        a = adv[rows]
        per = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) / n
        return per - 0.01 * ent if with_entropy else per

    return loss


def _check(dtype, n, v, d, temperature, entropy, tol_val, tol_grad, backend="torch", chunk_tokens=None, scale=1.0):
    torch.manual_seed(0)
    h = (torch.randn(n, d) * 0.7).to(dtype).requires_grad_()
    w = (torch.randn(v, d) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,))
    if n > 3:
        y[2] = -100
    tl = _ppo_loss(n, entropy)
    loss, lp, ent = fused_policy_loss(h, w, y, tl, temperature=temperature, backend=backend, chunk_tokens=chunk_tokens)
    (loss * scale).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rloss, rlp, rent = naive_policy_loss(h, w, y, tl, temperature=temperature)
    (rloss * scale).backward()
    torch.testing.assert_close(loss, rloss.detach(), atol=tol_val, rtol=tol_val)
    torch.testing.assert_close(lp, rlp, atol=tol_val, rtol=tol_val)
    torch.testing.assert_close(ent, rent, atol=tol_val, rtol=tol_val)
    torch.testing.assert_close(gh.float(), h.grad.float(), atol=tol_grad, rtol=tol_grad)
    torch.testing.assert_close(gw.float(), w.grad.float(), atol=tol_grad, rtol=tol_grad)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert not lp.requires_grad and not ent.requires_grad
    if n > 3:
        assert lp[2] == 0 and ent[2] == 0 and gh[2].abs().sum() == 0  # ignored row: no value, no gradient
    return gh


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("entropy", [False, True])
def test_fp32_matches_naive(temperature, entropy):
    # 70 tokens in chunks of 32 (a partial last chunk); vocabulary 9000 spans two 8192-row blocks
    gh = _check(torch.float32, 70, 9000, 48, temperature, entropy, 1e-5, 1e-5, chunk_tokens=32)
    assert gh.abs().sum() > 0


def test_incoming_gradient_scales_the_stored_gradients():
    # the trainer backpropagates loss * share
    _check(torch.float32, 20, 500, 16, 1.0, True, 1e-5, 1e-5, chunk_tokens=8, scale=0.37)


def test_bf16_matches_naive_loosely():
    _check(torch.bfloat16, 40, 777, 64, 1.0, True, 2e-2, 3e-2, chunk_tokens=16)


def test_loss_values_hand_computed():
    # two tokens, vocabulary 2, identity head: logits = hidden
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    w = torch.eye(2, requires_grad=True)
    y = torch.tensor([0, 1])
    loss, lp, ent = fused_policy_loss(h, w, y, lambda logp, ent, rows: -logp)
    want_lp = torch.tensor([-0.693147, -2.126928])  # log 1/2; 0 - log(e^2 + 1)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, -want_lp.sum(), atol=1e-5, rtol=0)
    loss.backward()
    p1 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    # dL/dz = p - onehot(y) for the loss -logp
    torch.testing.assert_close(
        h.grad, torch.stack([torch.tensor([-0.5, 0.5]), p1 - torch.tensor([0.0, 1.0])]), atol=1e-6, rtol=0
    )
    assert float(ent[0]) == pytest.approx(0.693147, abs=1e-5)


def test_empty_frozen_head_and_validation():
    w = torch.randn(10, 8, requires_grad=True)
    h = torch.zeros(0, 8, requires_grad=True)
    loss, lp, _ = fused_policy_loss(h, w, torch.zeros(0, dtype=torch.long), lambda lp, ent, rows: lp)
    assert lp.shape == (0,) and float(loss.detach()) == 0.0
    loss.backward()
    assert w.grad.shape == w.shape and w.grad.abs().sum() == 0
    # a frozen head: only the hidden states get a gradient
    h = torch.randn(5, 8, requires_grad=True)
    frozen = torch.randn(11, 8)
    fused_policy_loss(h, frozen, torch.arange(5), lambda lp, ent, rows: -lp)[0].backward()
    ref = h.detach().clone().requires_grad_()
    naive_policy_loss(ref, frozen, torch.arange(5), lambda lp, ent, rows: -lp)[0].backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one loss per token"):
        fused_policy_loss(torch.randn(3, 8), w, torch.zeros(3, dtype=torch.long), lambda lp, ent, rows: lp.sum())
    with pytest.raises(ValueError, match="targets must be"):
        fused_policy_loss(torch.randn(3, 8), w, torch.zeros(4, dtype=torch.long), lambda lp, ent, rows: lp)
    out = fused_policy_loss(
        torch.randn(3, 8, requires_grad=True), w, torch.zeros(3, dtype=torch.long), lambda lp, ent, rows: -lp
    )[0]
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.backward()


TRITON_SCRIPT = """
import torch
from tests.test_fused_policy_loss import _check
_check(torch.float32, 9, 200, 32, 0.7, True, 1e-5, 1e-5, backend="triton", chunk_tokens=4)
_check(torch.float32, 6, 130, 32, 1.0, False, 1e-5, 1e-5, backend="triton")
print("triton-ok")
"""


def test_triton_kernels_in_interpreter():
    """The Triton path on CPU tensors through TRITON_INTERPRET=1."""
    run_in_triton_interpreter(TRITON_SCRIPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_on_gpu():
    torch.manual_seed(0)
    h = torch.randn(300, 128, device="cuda", requires_grad=True)
    w = torch.randn(5000, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 5000, (300,), device="cuda")
    adv = torch.randn(300, device="cuda")

    def tl(lp, ent, rows):
        return -torch.exp(lp - lp.detach()) * adv[rows] - 0.01 * ent

    loss, lp, _ = fused_policy_loss(h, w, y, tl)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rloss, rlp, _ = naive_policy_loss(h, w, y, tl)
    rloss.backward()
    torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gh, h.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-4)
