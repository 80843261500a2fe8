"""Triton kernels for the fused log-prob: per-row softmax statistics and the in-place logit gradient.

Both work on one fp32 tile of logits ``z [Cn, V]`` (produced by a cuBLAS matmul of a token chunk),
one program per row, looping over the vocabulary in ``BLOCK_V`` blocks with an online log-sum-exp.
Run on CPU tensors with ``TRITON_INTERPRET=1`` (slow; small shapes only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(z_ptr, y_ptr, lse_ptr, tgt_ptr, ez_ptr, V, stride_z, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride_z passes 2^31 (16k rows x 152k vocab)
    base = z_ptr + row * stride_z
    y = tl.load(y_ptr + row)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        t = t * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(tgt_ptr + row, tl.load(base + y).to(tl.float32))
    tl.store(ez_ptr + row, t / s)


@triton.jit
def _logit_grad_kernel(
    z_ptr, y_ptr, lse_ptr, ez_ptr, g_ptr, ge_ptr, V, stride_z, inv_t, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)  # row * stride_z passes 2^31 (16k rows x 152k vocab)
    base = z_ptr + row * stride_z
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    if HAS_ENT:
        ge = tl.load(ge_ptr + row)
        ez = tl.load(ez_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0)
        p = tl.exp(z - lse)
        if HAS_ENT:
            gz = -p * (g + ge * (z - ez))
        else:
            gz = -p * g
        gz = tl.where(cols == y, gz + g, gz)
        tl.store(base + cols, gz * inv_t, mask=mask)


def _block(v: int) -> int:
    return min(4096, triton.next_power_of_2(v))


def row_stats(z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, ez: torch.Tensor) -> None:
    """Fill lse[i], tgt[i] = z[i, y_i], ez[i] = E_softmax(z_i)[z_i] for each row of ``z``."""
    n, v = z.shape
    if n == 0:
        return
    _row_stats_kernel[(n,)](z, y, lse, tgt, ez, v, z.stride(0), BLOCK_V=_block(v))


def logit_grad_(z, y, lse, ez, g, ge, inv_t: float) -> None:
    """Overwrite ``z`` with dL/dz * inv_t (the gradient w.r.t. the pre-temperature logits)."""
    n, v = z.shape
    if n == 0:
        return
    _logit_grad_kernel[(n,)](
        z, y, lse, ez, g, g if ge is None else ge, v, z.stride(0), inv_t, HAS_ENT=ge is not None, BLOCK_V=_block(v)
    )
