"""Layer read-outs through the LM head (the exit head of LayerSkip / CALM-style early exit).

For the hidden states of S chosen layers ``hidden [S, N, d]``, the model's final RMSNorm (weight
``g [d]``) and the LM head ``W [V, d]``::

    x      = g * h / sqrt(mean(h^2) + eps)                     # [S, N, d]
    z      = x @ W.T / T                                       # [S, N, V], only ever built tile by tile
    lse    = logsumexp_j z_j                                   # [S, N]
    max_lp = max_j z_j - lse,   argmax = first j attaining it  # [S, N]
    H      = lse - sum_j p_j z_j,   p = softmax(z)             # [S, N]
    tgt_lp = z_y - lse          (0 where y = ignore_index)     # [S, N]

The S*N rows stream over vocabulary tiles with the vocabulary loop outside: every tile of W is read
once for all layers and tokens, and only running per-row statistics (max, sum exp, sum p z, best,
argmax, target logit) are kept, never a ``[S*N, V]`` tensor. Gradients flow into ``hidden``, ``g``
and ``W`` through ``lse``, ``max_lp``, ``H`` and ``tgt_lp``; the backward recomputes each tile::

    dz_ij = g_lse p_ij + g_max (1[j = a_i] - p_ij) + g_tgt (1[j = y_i] - p_ij) - g_H p_ij (z_ij - E_i)

Two forward implementations share this driver: an exact chunked torch path (CPU, any device) and a
Triton kernel on CUDA that fuses the tile matmul with the statistics (``kernels.triton_exit_head``);
the backward is the torch tile loop on both (cuBLAS matmuls on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100
Backend = Literal["auto", "torch", "triton"]


@dataclass
class LayerReadout:
    """Per layer and token statistics of the LM head's distribution, all ``[S, N]``."""

    lse: torch.Tensor
    max_logp: torch.Tensor
    argmax: torch.Tensor  # long
    entropy: torch.Tensor
    target_logp: torch.Tensor  # 0 where the target is ignore_index (or no targets were given)


def pick_backend(backend: Backend, x: torch.Tensor) -> str:
    """'auto' -> Triton on CUDA when installed, else torch; 'triton' on CPU needs TRITON_INTERPRET=1."""
    if backend == "auto":
        if x.is_cuda:
            try:
                import triton  # noqa: F401

                return "triton"
            except ImportError:
                return "torch"
        return "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend {backend!r}: expected 'auto', 'torch' or 'triton'")
    return backend


def rms_norm(h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Qwen3 / Llama RMSNorm in fp32: ``weight * h / sqrt(mean(h^2) + eps)``."""
    hf = h.float()
    x = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight.float()


def _forward_torch(x, w, y, inv_t, cm, cv):
    """Running statistics over vocabulary tiles (outer) and row chunks (inner)."""
    M, V = x.shape[0], w.shape[0]
    dev = x.device
    m = torch.full((M,), -float("inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(M, dtype=torch.float32, device=dev)
    t = torch.zeros(M, dtype=torch.float32, device=dev)
    best = torch.full((M,), -float("inf"), dtype=torch.float32, device=dev)
    arg = torch.zeros(M, dtype=torch.long, device=dev)
    tgt = torch.zeros(M, dtype=torch.float32, device=dev)
    for b in range(0, V, cv):
        wb = w[b : b + cv].float()
        for a in range(0, M, cm):
            z = x[a : a + cm] @ wb.T  # [Cm, Cv] fp32
            if inv_t != 1.0:
                z.mul_(inv_t)
            zmax, zarg = z.max(dim=1)  # first index on ties
            mo = m[a : a + cm]
            m_new = torch.maximum(mo, zmax)
            scale = torch.exp(mo - m_new)
            e = torch.exp(z - m_new[:, None])
            s[a : a + cm] = s[a : a + cm] * scale + e.sum(1)
            t[a : a + cm] = t[a : a + cm] * scale + (e * z).sum(1)
            m[a : a + cm] = m_new
            better = zmax > best[a : a + cm]  # strictly: an earlier tile keeps a tie
            best[a : a + cm] = torch.where(better, zmax, best[a : a + cm])
            arg[a : a + cm] = torch.where(better, zarg + b, arg[a : a + cm])
            ya = y[a : a + cm]
            hit = (ya >= b) & (ya < b + z.shape[1])
            if bool(hit.any()):
                rows = hit.nonzero(as_tuple=True)[0]
                tgt[a + rows] = z[rows, ya[rows] - b]
    lse = m + torch.log(s)
    return lse, best, arg, tgt, t / s


def _backward_torch(x, w, y, valid, arg, inv_t, cm, cv, lse, ez, g_lse, g_max, g_ent, g_tgt, need_dx, need_dw):
    M, V = x.shape[0], w.shape[0]
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_dx else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    zero = torch.zeros(M, dtype=torch.float32, device=x.device)
    g_lse = zero if g_lse is None else g_lse
    g_max = zero if g_max is None else g_max
    g_tgt = zero if g_tgt is None else g_tgt * valid
    coef = g_max + g_tgt - g_lse  # dz = -p * (coef + g_H (z - E)) + one-hots
    for b in range(0, V, cv):
        wb = w[b : b + cv].float()
        dwb = torch.zeros_like(wb) if need_dw else None
        for a in range(0, M, cm):
            xa = x[a : a + cm]
            z = xa @ wb.T
            if inv_t != 1.0:
                z.mul_(inv_t)
            p = torch.exp(z - lse[a : a + cm, None])
            if g_ent is not None:
                gz = -p * (coef[a : a + cm, None] + g_ent[a : a + cm, None] * (z - ez[a : a + cm, None]))
            else:
                gz = p.mul_(-coef[a : a + cm, None])
            for idx, g in ((y[a : a + cm], g_tgt[a : a + cm]), (arg[a : a + cm], g_max[a : a + cm])):
                hit = (idx >= b) & (idx < b + z.shape[1])
                if bool(hit.any()):
                    rows = hit.nonzero(as_tuple=True)[0]
                    gz[rows, idx[rows] - b] += g[rows]
            if inv_t != 1.0:
                gz.mul_(inv_t)
            if dx is not None:
                dx[a : a + cm] += gz @ wb
            if dwb is not None:
                dwb += gz.T @ xa
        if dw is not None:
            dw[b : b + cv] = dwb
    return dx, dw


def _chunks(M: int, V: int, chunk_rows: int | None, chunk_vocab: int | None) -> tuple[int, int]:
    return chunk_rows or 1024, chunk_vocab or 2048


class _Readout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, y, inv_t, backend, cm, cv):
        valid = y != IGNORE_INDEX
        ys = torch.where(valid, y, torch.zeros_like(y))
        if x.shape[0] == 0:
            z0 = x.new_zeros(0, dtype=torch.float32)
            lse = best = tgt = ez = z0
            arg = torch.zeros(0, dtype=torch.long, device=x.device)
        elif backend == "triton":
            from kernels.triton_exit_head import readout_stats

            lse, best, arg, tgt, ez = readout_stats(x, w, ys, inv_t)
        else:
            lse, best, arg, tgt, ez = _forward_torch(x, w, ys, inv_t, cm, cv)
        ctx.save_for_backward(x, w, ys, valid, arg, lse, ez)
        ctx.cfg = (inv_t, cm, cv)
        ctx.mark_non_differentiable(arg)
        return lse, best - lse, arg, lse - ez, torch.where(valid, tgt - lse, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, g_lse, g_max, _g_arg, g_ent, g_tgt):
        x, w, ys, valid, arg, lse, ez = ctx.saved_tensors
        inv_t, cm, cv = ctx.cfg
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if x.shape[0] == 0 or not (need_dx or need_dw):
            return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(w) if need_dw else None) + (None,) * 5
        f = lambda g: None if g is None or not bool(g.any()) else g.float()  # noqa: E731
        dx, dw = _backward_torch(
            x, w, ys, valid, arg, inv_t, cm, cv, lse, ez, f(g_lse), f(g_max), f(g_ent), f(g_tgt), need_dx, need_dw
        )
        return (
            None if dx is None else dx.to(x.dtype),
            None if dw is None else dw.to(w.dtype),
            *[None] * 5,
        )


def layer_readout(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    eps: float = 1e-6,
    temperature: float = 1.0,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> LayerReadout:
    """LM-head statistics of S layers' hidden states without their logits (module docstring).

    hidden [S, N, d] (or [N, d] for S = 1) of any float dtype; weight [V, d]; norm_weight [d] (the
    final norm; None = hidden is already normalised); targets [N] (shared by the S layers) or
    [S, N], ``ignore_index`` = -100 (padding) -> target_logp 0 and no gradient. Returns
    ``LayerReadout`` of [S, N] fp32 tensors (argmax long)."""
    squeeze = hidden.dim() == 2
    h = hidden[None] if squeeze else hidden
    if h.dim() != 3 or weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [S, N, d] and weight [V, d]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    S, N, d = h.shape
    if norm_weight is not None and norm_weight.shape != (d,):
        raise ValueError(f"norm_weight must be [d={d}], got {tuple(norm_weight.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets is None:
        y = torch.full((S, N), IGNORE_INDEX, dtype=torch.long, device=h.device)
    elif targets.shape == (N,):
        y = targets.long()[None].expand(S, N)
    elif targets.shape == (S, N):
        y = targets.long()
    else:
        raise ValueError(f"targets must be [N={N}] or [S={S}, N={N}], got {tuple(targets.shape)}")
    V = weight.shape[0]
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= V))
    if bool(bad.any()):
        raise ValueError(f"targets hold ids outside [0, {V}): {y[bad][:5].tolist()}")
    be = pick_backend(backend, h)
    x = rms_norm(h, norm_weight, eps).reshape(S * N, d)
    if be == "triton" and weight.dtype != torch.float32:
        x = x.to(weight.dtype)  # the kernel reads both operands in the head's dtype, accumulates fp32
    cm, cv = _chunks(S * N, V, chunk_rows, chunk_vocab)
    lse, max_lp, arg, ent, tgt = _Readout.apply(x, weight, y.reshape(-1).contiguous(), 1.0 / temperature, be, cm, cv)
    out = [t.reshape(S, N) for t in (lse, max_lp, arg, ent, tgt)]
    if squeeze:
        out = [t[0] for t in out]
    return LayerReadout(*out)


def naive_layer_readout(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    eps: float = 1e-6,
    temperature: float = 1.0,
) -> LayerReadout:
    """Reference (and the bench's baseline): each layer's full [N, V] logits through log_softmax."""
    h = hidden[None] if hidden.dim() == 2 else hidden
    outs = []
    for s in range(h.shape[0]):
        x = rms_norm(h[s], norm_weight, eps).to(weight.dtype)
        logits = (x @ weight.T).float() / temperature  # [N, V]
        logp = torch.log_softmax(logits, -1)
        mx, arg = logp.max(-1)
        ent = -(logp.exp() * logp).sum(-1)
        if targets is None:
            tl = torch.zeros_like(mx)
        else:
            y = (targets if targets.dim() == 1 else targets[s]).long()
            valid = y != IGNORE_INDEX
            tl = logp.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1) * valid
        outs.append((torch.logsumexp(logits, -1), mx, arg, ent, tl))
    stacked = [torch.stack(t) for t in zip(*outs)]
    if hidden.dim() == 2:
        stacked = [t[0] for t in stacked]
    return LayerReadout(*stacked)
