"""Triton kernels for the exit head: LM-head read-out statistics and windowed means of all layers.

``readout_stats``: one program per block of ``BLOCK_M`` rows (rows = (layer, token) pairs) walks the
vocabulary in ``BLOCK_V`` tiles; each tile's logits are a ``tl.dot`` over ``BLOCK_D`` slices of the
rows and of W (fp32 accumulation), and only the running statistics leave registers: max, sum exp,
sum exp * z, best logit, its first index, the target's logit. Never a [M, V] buffer.

``window_sums``: one program per (layer, sequence, d-block) reads that sequence's T hidden states
once and adds each real token into its window's accumulator (``[W, BLOCK_D]`` in registers).

Run on CPU tensors with ``TRITON_INTERPRET=1`` (slow; small shapes only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_offset(lb, T, ts, D):
    """Element offset of token ``ts`` of sequence-layer ``lb`` in a contiguous ``[L*B, T, D]``
    tensor, in int64: L*B*T*d passes 2^31 for an 8B model's router features (int32 would wrap)."""
    return (lb.to(tl.int64) * T + ts) * D


@triton.jit
def _readout_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    lse_ptr,
    best_ptr,
    arg_ptr,
    tgt_ptr,
    ez_ptr,
    M,
    V,
    D,
    stride_x,
    stride_w,
    inv_t,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # rows * stride_x passes 2^31 for long batches of wide models
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int64)
    tgt = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            xmask = rmask[:, None] & dmask[None, :]
            wmask = cmask[:, None] & dmask[None, :]
            xb = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :], mask=xmask, other=0.0)
            wb = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=wmask, other=0.0)
            acc += tl.dot(xb, tl.trans(wb), input_precision=PRECISION)
        z = tl.where(cmask[None, :], acc * inv_t, -float("inf"))
        zmax = tl.max(z, axis=1)
        # first column attaining the tile's max (ties -> lowest index)
        zarg = tl.min(tl.where(z == zmax[:, None], cols[None, :], V + BLOCK_V), axis=1)
        m_new = tl.maximum(m, zmax)
        scale = tl.exp(m - m_new)
        e = tl.where(cmask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * scale + tl.sum(e, axis=1)
        t = t * scale + tl.sum(e * tl.where(cmask[None, :], z, 0.0), axis=1)
        m = m_new
        better = zmax > best
        best = tl.where(better, zmax, best)
        arg = tl.where(better, zarg.to(tl.int64), arg)
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rmask)
    tl.store(best_ptr + rows, best, mask=rmask)
    tl.store(arg_ptr + rows, arg, mask=rmask)
    tl.store(tgt_ptr + rows, tgt, mask=rmask)
    tl.store(ez_ptr + rows, t / s, mask=rmask)


def _precision(x: torch.Tensor) -> str:
    """fp32 operands multiply in full precision (no TF32: the read-out must match the torch path)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def readout_stats(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, inv_t: float):
    """(lse, best logit, argmax, target logit, E_p[z]) per row of ``x [M, d]`` under ``w [V, d]``."""
    x, w, y = x.contiguous(), w.contiguous(), y.contiguous()
    M, D = x.shape
    V = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    lse, best, tgt, ez = (torch.empty(M, **f32) for _ in range(4))
    arg = torch.empty(M, dtype=torch.long, device=x.device)
    BLOCK_M, BLOCK_V = 32, 64
    BLOCK_D = min(64, max(16, triton.next_power_of_2(D)))
    _readout_kernel[(triton.cdiv(M, BLOCK_M),)](
        x, w, y, lse, best, arg, tgt, ez, M, V, D, x.stride(0), w.stride(0), inv_t,
        BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, PRECISION=_precision(x),
    )  # fmt: skip
    return lse, best, arg, tgt, ez


@triton.jit
def _window_sums_kernel(
    h_ptr, win_ptr, out_ptr, B, T, D, W, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    lb = tl.program_id(0)  # layer * B + sequence
    dblk = tl.program_id(1)
    b = lb % B
    ds = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    wins = tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_W, BLOCK_D), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tmask = ts < T
        win = tl.load(win_ptr + b * T + ts, mask=tmask, other=W)  # W = padding (no window)
        hmask = tmask[:, None] & dmask[None, :]
        h = tl.load(h_ptr + _window_offset(lb, T, ts[:, None], D) + ds[None, :], mask=hmask, other=0.0)
        onehot = (win[None, :] == wins[:, None]).to(tl.float32)  # [BLOCK_W, BLOCK_T]
        acc += tl.dot(onehot, h.to(tl.float32), input_precision="ieee")
    out_at = _window_offset(lb, W, wins[:, None], D) + ds[None, :]
    tl.store(out_ptr + out_at, acc, mask=(wins[:, None] < W) & dmask[None, :])


def window_sums(h: torch.Tensor, win: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Sums [L, B, W, d] (fp32) of ``h [L, B, T, d]`` per window; ``win [B, T]`` gives each token's
    window (``num_windows`` = padding, in no window)."""
    h = h.contiguous()
    L, B, T, D = h.shape
    out = torch.empty(L, B, num_windows, D, dtype=torch.float32, device=h.device)
    BLOCK_D = min(64, max(16, triton.next_power_of_2(D)))
    BLOCK_W = max(16, triton.next_power_of_2(num_windows))
    _window_sums_kernel[(L * B, triton.cdiv(D, BLOCK_D))](
        h, win.to(torch.int32).contiguous(), out, B, T, D, num_windows,
        BLOCK_W=BLOCK_W, BLOCK_T=32, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out
