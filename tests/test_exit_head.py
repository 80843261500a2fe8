"""Exit-head kernels against naive float64 references: layer read-outs through the LM head and all
routers at once (values, gradients, argmax ties, padding, S = 1, vocab not a multiple of the tile)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.batched_routers import (
    all_layer_window_means,
    focal_loss,
    fused_router_focal_loss,
)
from kernels.exit_head import IGNORE_INDEX, layer_readout, naive_layer_readout
from tests.test_fused_logprob import run_in_triton_interpreter


def _inputs(S=3, N=7, d=16, V=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(S, N, d, generator=g) * 2).to(dtype)
    w = torch.randn(V, d, generator=g).to(dtype)
    gn = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = IGNORE_INDEX  # a padding position
    return h, w, gn, y


def _reference(h, w, gn, y, temperature=1.0, eps=1e-6):
    """float64, full logits, written independently of the kernels."""
    h64, w64, g64 = h.double(), w.double(), gn.double()
    x = g64 * h64 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + eps)
    z = x @ w64.T / temperature  # [S, N, V]
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    p = logp.exp()
    valid = y != IGNORE_INDEX
    tgt = logp.gather(-1, torch.where(valid, y, 0)[None, :, None].expand(h.shape[0], -1, 1)).squeeze(-1) * valid
    return lse, logp.max(-1).values, logp.argmax(-1), -(p * logp).sum(-1), tgt


def _check_readout(backend="torch", temperature=0.7, chunk_rows=4, chunk_vocab=8, S=3, atol=1e-5):
    h, w, gn, y = _inputs(S=S)
    out = layer_readout(
        h, w, gn, y, temperature=temperature, backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab
    )
    ref = _reference(h, w, gn, y, temperature)
    for name, got, want in zip(("lse", "max_logp", "argmax", "entropy", "target_logp"), vars(out).values(), ref):
        if name == "argmax":
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=name)
    assert float(out.target_logp[:, 1].abs().max()) == 0.0  # the padding position


def test_readout_values_match_float64_with_odd_tiles_and_padding():
    _check_readout()  # V = 37 over vocab tiles of 8, 21 rows over row chunks of 4
    _check_readout(chunk_rows=1024, chunk_vocab=2048, temperature=1.0)  # one tile


def test_readout_s1_accepts_2d_hidden():
    h, w, gn, y = _inputs(S=1)
    a = layer_readout(h[0], w, gn, y, chunk_vocab=5)
    b = layer_readout(h, w, gn, y, chunk_vocab=5)
    assert a.lse.shape == (7,) and b.lse.shape == (1, 7)
    torch.testing.assert_close(a.entropy, b.entropy[0])
    torch.testing.assert_close(a.lse.double(), _reference(h, w, gn, y)[0][0], atol=1e-5, rtol=1e-5)


def _check_ties(backend="torch"):
    """Entries +-1 (so the RMS norm is exactly 1 at eps = 0) against small integer weights: every
    logit is an exact integer, and most rows have their maximum at several indices."""
    g = torch.Generator().manual_seed(5)
    h = torch.randint(0, 2, (2, 16, 16), generator=g).float() * 2 - 1
    w = torch.randint(-2, 3, (45, 16), generator=g).float()
    z = h.double() @ w.double().T  # exact
    top = z.argmax(-1)  # the first index attaining the max
    ties = (z == z.max(-1, keepdim=True).values).sum(-1)
    assert int((ties > 1).sum()) >= 4  # the case happens
    for cv in (8, 64):  # tied columns in different tiles; in one tile
        out = layer_readout(h, w, None, None, eps=0.0, chunk_vocab=cv, backend=backend)
        assert torch.equal(out.argmax, top), cv


def test_readout_argmax_ties_pick_the_first_index():
    _check_ties()


@pytest.mark.parametrize("chunk_vocab", [8, 64])  # vocabulary tiles with a running rescale; one tile
def test_readout_gradients_match_float64(chunk_vocab):
    h, w, gn, y = _inputs()
    coefs = torch.tensor([0.3, -0.7, 1.1, 0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(4)]

    def loss_of(outs):
        lse, mx, ent, tgt = outs
        return sum(c * (wt * t.double()).sum() for c, wt, t in zip(coefs, weights, (lse, mx, ent, tgt)))

    leaves = [t.clone().requires_grad_() for t in (h, w, gn)]
    out = layer_readout(leaves[0], leaves[1], leaves[2], y, temperature=0.7, chunk_rows=4, chunk_vocab=chunk_vocab)
    loss_of((out.lse, out.max_logp, out.entropy, out.target_logp)).backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (h, w, gn)]
    lse, mx, _, ent, tgt = _reference(*ref_leaves, y, 0.7)
    loss_of((lse, mx, ent, tgt)).backward()
    for name, a, b in zip(("hidden", "weight", "norm"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4, msg=name)
        assert float(b.grad.abs().max()) > 1e-3  # the gradient is not trivially zero


def test_readout_bf16_inputs_accumulate_in_fp32():
    h, w, gn, y = _inputs(dtype=torch.bfloat16)
    out = layer_readout(h, w, gn, y, chunk_vocab=8)
    ref = naive_layer_readout(h, w, gn, y)
    torch.testing.assert_close(out.lse, ref.lse, atol=2e-2, rtol=2e-2)
    assert float((out.argmax == ref.argmax).float().mean()) >= 0.9


def test_readout_rejects_bad_shapes_and_targets():
    h, w, gn, y = _inputs()
    with pytest.raises(ValueError, match="targets must be"):
        layer_readout(h, w, gn, y[:3])
    with pytest.raises(ValueError, match="outside"):
        layer_readout(h, w, gn, torch.full_like(y, 99))
    with pytest.raises(ValueError, match="norm_weight"):
        layer_readout(h, w, gn[:3], y)


# ---------------------------------------------------------------------------------------------
# all routers at once


def _naive_window_means(h, mask, W):
    """Per layer, per row, per window: the loops the batched kernel replaces (float64)."""
    L, B, T, d = h.shape
    means = torch.zeros(B, L, W, d, dtype=torch.float64)
    valid = torch.zeros(B, W, dtype=torch.bool)
    for b in range(B):
        real = mask[b].nonzero().squeeze(-1).tolist()
        n = len(real)
        w = min(W, n)
        for k in range(w):
            toks = [t for r, t in enumerate(real) if r * w // n == k]
            valid[b, k] = True
            for layer in range(L):
                means[b, layer, k] = h[layer, b, toks].double().mean(0)
    return means, valid


def _router_weights(L, d, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 0.5 for s in ((L, d, r), (L, r), (L, r, 3), (L, 3))]


def _masks():
    mask = torch.ones(4, 13, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    mask[2, :10] = 0  # 3 real tokens: fewer than W windows
    return mask


def test_window_means_match_the_per_window_loop():
    h = torch.randn(5, 4, 13, 6)
    mask = _masks()
    means, valid = all_layer_window_means(h, mask, num_windows=4)
    ref_m, ref_v = _naive_window_means(h, mask, 4)
    assert torch.equal(valid, ref_v)
    assert valid.sum(1).tolist() == [4, 4, 3, 4]
    torch.testing.assert_close(means.double(), ref_m, atol=1e-6, rtol=1e-6)
    listed, _ = all_layer_window_means(list(h), mask, num_windows=4)  # L tensors [B, T, d]
    torch.testing.assert_close(listed, means)


def test_batched_router_loss_matches_a_loop_over_layers_values_and_grads():
    L, B, T, d = 5, 4, 13, 6
    h = torch.randn(L, B, T, d, dtype=torch.float64)
    mask = _masks()
    labels = torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(3))
    cw = torch.tensor([2.0, 0.5, 1.0])
    params = [p.clone().requires_grad_() for p in _router_weights(L, d)]
    hh = h.float().clone().requires_grad_()
    loss, logits = fused_router_focal_loss(hh, mask, *params, labels, cw, gamma=2.0, num_windows=4)
    loss.backward()
    # reference: a Python loop over layers, float64, hand-written focal loss
    ref_params = [p.detach().double().clone().requires_grad_() for p in params]
    ref_h = h.clone().requires_grad_()
    means, valid = _naive_window_means(ref_h.detach(), mask, 4)  # values only (loop in float64)
    # differentiable float64 means for the reference gradient
    rows = []
    for layer in range(L):
        w1, b1, w2, b2 = (p[layer] for p in ref_params)
        per_b = []
        for b in range(B):
            real = mask[b].nonzero().squeeze(-1).tolist()
            n, wn = len(real), min(4, len(real))
            outs = []
            for k in range(wn):
                toks = [t for r, t in enumerate(real) if r * wn // n == k]
                m = ref_h[layer, b, toks].mean(0)
                outs.append(F.gelu(m @ w1 + b1) @ w2 + b2)
            per_b.append(torch.stack(outs).mean(0))
        rows.append(torch.stack(per_b))
    ref_logits = torch.stack(rows, 1)  # [B, L, 3]
    logp = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ref_loss = (cw.double()[labels] * (1 - logp.exp()) ** 2 * -logp).mean()
    ref_loss.backward()
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(hh.grad.double(), ref_h.grad, atol=1e-6, rtol=1e-4)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)
    assert float(hh.grad[:, 0, :5].abs().max()) == 0.0  # padding gets no gradient
    assert float(means.abs().sum()) > 0 and bool(valid.any())


def test_batched_logits_equal_the_routers_own_loop():
    from rollout.routing.routers import LayerRouters, RouterConfig

    L, d = 4, 6
    routers = LayerRouters(RouterConfig(L, d, router_hidden=8, num_windows=4))
    h = torch.randn(L, 4, 13, d)
    mask = _masks()
    loop = torch.stack([routers.layer_logits(layer, h[layer], mask) for layer in range(L)], 1)
    torch.testing.assert_close(routers.all_layer_logits(h, mask), loop, atol=1e-6, rtol=1e-6)


def test_router_action_logprobs_and_ppo_loss_by_hand():
    from rl.trainer.layer_group import action_logprobs, router_ppo_loss

    # one row, one layer: logits (0, ln 2, ln 3) -> pi = (1/6, 2/6, 3/6); action 2, advantage 0.5
    logits = torch.tensor([[[0.0, 0.6931471805599453, 1.0986122886681098]]])
    logp, ent = action_logprobs(logits, torch.tensor([[2]]), temperature=1.0)
    p = torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64)
    h = float(-(p * p.log()).sum())
    assert float(logp[0, 0]) == pytest.approx(float(torch.log(p[2])), rel=1e-6)
    assert float(ent[0, 0]) == pytest.approx(h, rel=1e-6)
    # on-policy (ratio 1): -A - c_H H; a ratio of 1.5 clips at 1.2 for a positive advantage
    loss = router_ppo_loss(logp, logp.detach(), torch.tensor([0.5]), ent, clip=0.2, entropy_coef=0.1)
    assert float(loss) == pytest.approx(-0.5 - 0.1 * h, rel=1e-6)
    far = router_ppo_loss(logp, logp.detach() - math.log(1.5), torch.tensor([0.5]), ent, clip=0.2, entropy_coef=0.0)
    assert float(far) == pytest.approx(-0.5 * 1.2, rel=1e-6)


def test_focal_loss_on_layers_equals_flat():
    z = torch.randn(4, 5, 3)
    y = torch.randint(0, 3, (4, 5))
    w = torch.tensor([1.0, 2.0, 3.0])
    assert float(focal_loss(z, y, w)) == pytest.approx(float(focal_loss(z.reshape(-1, 3), y.reshape(-1), w)))


TRITON_SCRIPT = """
import torch
from tests.test_exit_head import _check_readout, _check_ties, _masks, _naive_window_means
from kernels.batched_routers import all_layer_window_means
_check_readout(backend="triton", temperature=0.7)          # V = 37: a partial vocab block, 21 rows
_check_readout(backend="triton", temperature=1.0, S=1)
_check_ties(backend="triton")
h = torch.randn(3, 4, 13, 20, requires_grad=True)           # d = 20: a partial d block
mask = _masks()
m, v = all_layer_window_means(h, mask, 4, backend="triton")
rm, rv = _naive_window_means(h.detach(), mask, 4)
assert torch.equal(v, rv)
torch.testing.assert_close(m.double(), rm, atol=1e-5, rtol=1e-5)
g = torch.randn_like(m)
(m * g).sum().backward()
h2 = h.detach().clone().requires_grad_()
m2, _ = all_layer_window_means(h2, mask, 4, backend="torch")
(m2 * g).sum().backward()
torch.testing.assert_close(h.grad, h2.grad, atol=1e-6, rtol=1e-5)
print("triton-ok")
"""


def test_exit_head_triton_kernels_in_interpreter():
    """The Triton read-out and window-sum kernels on CPU tensors through TRITON_INTERPRET=1."""
    run_in_triton_interpreter(TRITON_SCRIPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exit_head_triton_on_gpu():
    torch.manual_seed(0)
    h = torch.randn(4, 300, 128, device="cuda")
    w = torch.randn(5003, 128, device="cuda")
    gn = torch.ones(128, device="cuda")
    y = torch.randint(0, 5003, (300,), device="cuda")
    out = layer_readout(h, w, gn, y)
    ref = naive_layer_readout(h, w, gn, y)
    torch.testing.assert_close(out.lse, ref.lse, atol=1e-4, rtol=1e-4)
    assert float((out.argmax == ref.argmax).float().mean()) > 0.999


OFFSET_PROBE = """
import triton
import triton.language as tl

from kernels.triton_exit_head import _window_offset


@triton.jit
def probe(out_ptr, lb, T, D, BLOCK: tl.constexpr):
    ts = tl.arange(0, BLOCK)
    tl.store(out_ptr + ts, _window_offset(lb, T, ts, D))
"""


def test_window_sum_offsets_are_int64_past_2_31(tmp_path):
    """The window-sum kernel's element offsets for L*B*T*d beyond 2^31 (an 8B model's router
    features: 36 layers x 64 rows x 4096 tokens x 4096 d), computed by the kernel's own helper in the
    interpreter: exact, where int32 arithmetic would wrap."""
    (tmp_path / "offset_probe.py").write_text(OFFSET_PROBE)
    script = f"""
import sys, torch
sys.path.insert(0, {str(tmp_path)!r})
from offset_probe import probe
lb, T, D = 36 * 64 - 1, 4096, 4096
out = torch.zeros(4, dtype=torch.int64)
probe[(1,)](out, lb, T, D, BLOCK=4)
want = [(lb * T + t) * D for t in range(4)]
assert want[0] > 2**31 and out.tolist() == want, (out.tolist(), want)
print("triton-ok")
"""
    run_in_triton_interpreter(script)


def test_the_exit_head_rounds_the_final_norm_as_the_model_does():
    """bf16: Qwen3's RMSNorm casts the normalised rows to bf16 before the weight multiplies them;
    the exit head does the same (bit-equal), where multiplying in fp32 first differs."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from kernels.exit_head import rms_norm

    torch.manual_seed(0)
    norm = Qwen3RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 2 + 1)
    h = (torch.randn(32, 64) * 3).to(torch.bfloat16)
    with torch.no_grad():
        want = norm(h).float()
    assert torch.equal(rms_norm(h, norm.weight, 1e-6), want)
    hf = h.float()
    fp32_first = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    assert not torch.equal(fp32_first, want)  # the case is real: the old order rounds differently
    f32 = (torch.randn(8, 64) * 3).requires_grad_(False)
    norm32 = Qwen3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm32.weight.copy_(torch.randn(64))
        assert torch.allclose(rms_norm(f32, norm32.weight, 1e-6), norm32(f32), atol=1e-6)
