import os
import subprocess
import sys

import pytest
import torch

from kernels.fused_logprob import fused_logprob, naive_logprob


def _check(dtype, n, v, d, temperature, entropy, tol_val, tol_grad, backend="torch", **chunks):
    torch.manual_seed(0)
    h = (torch.randn(n, d) * 0.7).to(dtype).requires_grad_()
    w = (torch.randn(v, d) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,))
    if n > 3:
        y[2] = -100
    a = torch.randn(n)
    b = torch.randn(n)
    out = fused_logprob(h, w, y, temperature=temperature, return_entropy=entropy, backend=backend, **chunks)
    lp, ent = out if entropy else (out, None)
    loss = (lp * a).sum() + ((ent * b).sum() if entropy else 0)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = naive_logprob(h, w, y, temperature=temperature, return_entropy=entropy)
    rlp, rent = ref if entropy else (ref, None)
    ((rlp * a).sum() + ((rent * b).sum() if entropy else 0)).backward()
    torch.testing.assert_close(lp, rlp, atol=tol_val, rtol=tol_val)
    if entropy:
        torch.testing.assert_close(ent, rent, atol=tol_val, rtol=tol_val)
    torch.testing.assert_close(gh.float(), h.grad.float(), atol=tol_grad, rtol=tol_grad)
    torch.testing.assert_close(gw.float(), w.grad.float(), atol=tol_grad, rtol=tol_grad)
    if n > 3:
        assert lp[2] == 0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("entropy", [False, True])
def test_fp32_matches_naive(temperature, entropy):
    # vocabulary 1000 is not a multiple of the 384 tile; 70 tokens not a multiple of 32
    _check(torch.float32, 70, 1000, 48, temperature, entropy, 1e-5, 1e-5, chunk_tokens=32, chunk_vocab=384)


def test_bf16_matches_naive_loosely():
    _check(torch.bfloat16, 40, 777, 64, 1.0, True, 2e-2, 3e-2, chunk_tokens=16, chunk_vocab=256)


def test_empty_and_validation():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    lp = fused_logprob(h, w, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)
    lp.sum().backward()
    assert w.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="targets must be"):
        fused_logprob(torch.randn(3, 8), w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(torch.randn(3, 8), w, torch.zeros(3, dtype=torch.long), temperature=0)


def test_frozen_head_gets_no_weight_grad():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    fused_logprob(h, w, torch.arange(5)).sum().backward()
    ref_h = h.detach().clone().requires_grad_()
    naive_logprob(ref_h, w, torch.arange(5)).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, atol=1e-5, rtol=1e-5)


TRITON_SCRIPT = """
import torch
from tests.test_fused_logprob import _check
_check(torch.float32, 9, 200, 32, 0.7, True, 1e-5, 1e-5, backend="triton", chunk_tokens=4)
_check(torch.float32, 6, 130, 32, 1.0, False, 1e-5, 1e-5, backend="triton")
print("triton-ok")
"""


def run_in_triton_interpreter(script: str) -> None:
    """Run ``script`` (which prints 'triton-ok' when its checks pass) with TRITON_INTERPRET=1 in a
    fresh process: the flag is read when triton is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert "triton-ok" in out.stdout, out.stderr[-3000:]


def test_triton_kernels_in_interpreter():
    """The Triton kernels on CPU tensors through TRITON_INTERPRET=1."""
    run_in_triton_interpreter(TRITON_SCRIPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_on_gpu():
    torch.manual_seed(0)
    h = torch.randn(300, 128, device="cuda", requires_grad=True)
    w = torch.randn(5000, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 5000, (300,), device="cuda")
    lp, ent = fused_logprob(h, w, y, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rlp, rent = naive_logprob(h, w, y, return_entropy=True)
    (rlp.sum() + rent.sum()).backward()
    torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gh, h.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-4)
