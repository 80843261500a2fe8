"""Layer read-outs through the LM head (the exit head of LayerSkip / CALM-style early exit).

For the hidden states of S chosen layers ``hidden [S, N, d]``, the model's final RMSNorm (weight
``g [d]``) and the LM head ``W [V, d]``::

    x      = g * h / sqrt(mean(h^2) + eps)                     # [S, N, d]
    z      = x @ W.T / T                                       # [S, N, V], only ever built tile by tile
    lse    = logsumexp_j z_j                                   # [S, N]
    max_lp = max_j z_j - lse,   argmax = first j attaining it  # [S, N]
    H      = lse - sum_j p_j z_j,   p = softmax(z)             # [S, N]
    tgt_lp = z_y - lse          (0 where y = ignore_index)     # [S, N]

Rows are (layer, token) pairs run in token chunks: a chunk (every layer of its tokens) is
normalised inside the kernel and streams over the vocabulary tiles, so one pass over W serves every
layer of the chunk's tokens (never one LM-head pass per layer), and only running per-row statistics
(max, sum exp, sum exp * z, best, argmax, target logit) are kept: no ``[S*N, V]`` logits and no
normalised copy of all the hidden states. Gradients flow into ``hidden``, ``g`` and ``W`` through
``lse``, ``max_lp``, ``H`` and ``tgt_lp``; the backward recomputes each tile::

    dz_ij = g_lse p_ij + g_max (1[j = a_i] - p_ij) + g_tgt (1[j = y_i] - p_ij) - g_H p_ij (z_ij - E_i)

and the RMS norm's backward by hand.

Two forward implementations share this driver: an exact chunked torch path (CPU, any device) and a
Triton kernel on CUDA that fuses the tile matmul with the statistics (``kernels.triton_exit_head``);
the backward is the torch tile loop on both (cuBLAS matmuls on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import Backend, pick_backend

IGNORE_INDEX = -100


@dataclass
class LayerReadout:
    """Per layer and token statistics of the LM head's distribution, all ``[S, N]``."""

    lse: torch.Tensor
    max_logp: torch.Tensor
    argmax: torch.Tensor  # long
    entropy: torch.Tensor
    target_logp: torch.Tensor  # 0 where the target is ignore_index (or no targets were given)


def rms_norm(h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Qwen3 / Llama RMSNorm, as fp32: ``weight * (h / sqrt(mean(h^2) + eps)).to(h.dtype)``."""
    return _normed_chunk(h.float(), weight, eps, h.dtype)[0]


def _apply_norm_weight(xhat: torch.Tensor, gn: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``gn * xhat`` as the model's RMSNorm rounds it: the normalised rows cast to the input dtype
    first, then times the weight (Qwen3, Llama: ``self.weight * hidden.to(input_dtype)``); in fp32
    that is the plain product. Returns fp32."""
    if gn is None:
        return xhat
    if dtype == torch.float32 and gn.dtype == torch.float32:
        return xhat * gn
    return (gn * xhat.to(dtype)).float()


def _normed_chunk(
    hf: torch.Tensor, gn: torch.Tensor | None, eps: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, xhat) of an fp32 row chunk of inputs in ``dtype``: xhat = h * rsqrt(mean(h^2) + eps),
    x = gn * xhat (``_apply_norm_weight``)."""
    xhat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return _apply_norm_weight(xhat, gn, dtype), xhat


def _normed_rows(h: torch.Tensor, gn: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x of a row chunk, as ``_normed_chunk`` but with one fp32 buffer where it can (the forward needs no xhat)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if gn is not None and h.dtype == torch.float32 and gn.dtype == torch.float32:
        return x.mul_(gn)
    return _apply_norm_weight(x, gn, h.dtype)


def _chunk_stats(x, w, y, inv_t, cv):
    """One row chunk's statistics over all vocabulary tiles (torch path)."""
    M, V = x.shape[0], w.shape[0]
    if V <= cv:  # the whole vocabulary is one tile: no running rescale, two [Cm, V] buffers
        z = x @ w.float().T  # [Cm, V] fp32
        if inv_t != 1.0:
            z.mul_(inv_t)
        best, arg = z.max(dim=1)  # first index on ties
        tgt = z.gather(1, y[:, None]).squeeze(1)
        zc = z.sub_(best[:, None])  # z - max, in place
        e = zc.exp()
        s = e.sum(1)
        ez = torch.einsum("ij,ij->i", e, zc) / s + best  # E_p[z]
        return best + torch.log(s), best, arg, tgt, ez
    dev = x.device
    m = torch.full((M,), -float("inf"), dtype=torch.float32, device=dev)
    s, t, tgt = (torch.zeros(M, dtype=torch.float32, device=dev) for _ in range(3))
    best = torch.full((M,), -float("inf"), dtype=torch.float32, device=dev)
    arg = torch.zeros(M, dtype=torch.long, device=dev)
    for b in range(0, V, cv):
        z = x @ w[b : b + cv].float().T  # [Cm, Cv] fp32
        if inv_t != 1.0:
            z.mul_(inv_t)
        zmax, zarg = z.max(dim=1)  # first index on ties
        m_new = torch.maximum(m, zmax)
        scale = torch.exp(m - m_new)
        cols = z.shape[1]
        zt = z.gather(1, (y - b).clamp(0, cols - 1)[:, None]).squeeze(1)
        tgt = torch.where((y >= b) & (y < b + cols), zt, tgt)
        e = torch.exp(z - m_new[:, None])  # [Cm, Cv]
        s = s * scale + e.sum(1)
        t = t * scale + torch.einsum("ij,ij->i", e, z)  # no [Cm, Cv] product temporary
        m = m_new
        better = zmax > best  # strictly: an earlier tile keeps a tie
        best = torch.where(better, zmax, best)
        arg = torch.where(better, zarg + b, arg)
    return m + torch.log(s), best, arg, tgt, t / s


def _token_chunks(S: int, N: int, cm: int):
    """Token slices of about ``cm`` rows each (a slice covers every layer of its tokens)."""
    cn = max(1, cm // S)
    return [slice(a, min(N, a + cn)) for a in range(0, N, cn)]


def _forward(h, gn, w, y, eps, inv_t, backend, cm, cv):
    """h [S, N, d], y [S, N]. Token chunks (every layer of the chunk's tokens: one pass over W serves
    all S) outside, vocabulary tiles inside."""
    S, N, d = h.shape
    outs = [torch.empty(S, N, dtype=torch.float32, device=h.device) for _ in range(5)]
    outs[2] = torch.empty(S, N, dtype=torch.long, device=h.device)
    for sl in _token_chunks(S, N, cm):
        x = _normed_rows(h[:, sl].reshape(-1, d), gn, eps)  # [S * n, d]
        ys = y[:, sl].reshape(-1).clamp(min=0)  # ignore_index -> 0 (its target_logp is masked)
        if backend == "triton":
            from kernels.triton_exit_head import readout_stats

            res = readout_stats(x.to(w.dtype) if w.dtype != torch.float32 else x, w, ys, inv_t)
        else:
            res = _chunk_stats(x, w, ys, inv_t, cv)
        for o, r in zip(outs, res):
            o[:, sl] = r.view(S, -1)
    return outs  # lse, best, arg, tgt, ez


def _backward(h, gn, w, y, arg, eps, inv_t, cm, cv, lse, ez, g_lse, g_max, g_ent, g_tgt, needs):
    """Tile recompute: dz per tile, dx = dz @ W, dW += dz.T @ x, then the RMS norm's backward::

    dgn = sum_rows dx * xhat;   dh = r * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dx * gn
    """
    S, N, d = h.shape
    V = w.shape[0]
    need_dh, need_dw, need_dg = needs
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    dg = torch.zeros(d, dtype=torch.float32, device=h.device) if need_dg else None
    zero = torch.zeros(S, N, dtype=torch.float32, device=h.device)
    g_lse, g_max, g_tgt = (zero if g is None else g for g in (g_lse, g_max, g_tgt))
    coef = g_max + g_tgt - g_lse  # dz = -p * (coef + g_H (z - E)) + one-hots
    for sl in _token_chunks(S, N, cm):
        hf = h[:, sl].reshape(-1, d).float()
        x, xhat = _normed_chunk(hf, gn, eps, h.dtype)
        dx = torch.zeros_like(x)
        lse_c, ez_c, coef_c = (t[:, sl].reshape(-1, 1) for t in (lse, ez, coef))
        ge_c = None if g_ent is None else g_ent[:, sl].reshape(-1, 1)
        pairs = [(y[:, sl].reshape(-1), g_tgt[:, sl].reshape(-1)), (arg[:, sl].reshape(-1), g_max[:, sl].reshape(-1))]
        for b in range(0, V, cv):
            wb = w[b : b + cv].float()
            z = x @ wb.T
            if inv_t != 1.0:
                z.mul_(inv_t)
            p = torch.exp(z - lse_c)
            gz = -p * (coef_c + ge_c * (z - ez_c)) if ge_c is not None else p.mul_(-coef_c)
            cols = z.shape[1]
            for idx, g in pairs:
                hit = (idx >= b) & (idx < b + cols)
                gz.scatter_add_(1, (idx - b).clamp(0, cols - 1)[:, None], (g * hit)[:, None])
            if inv_t != 1.0:
                gz.mul_(inv_t)
            dx += gz @ wb
            if dw is not None:
                dw[b : b + cv] += gz.T @ x
        if dg is not None:
            dg += (dx * xhat).sum(0)
        if dh is not None:
            dxhat = dx if gn is None else dx * gn.float()
            r = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
            dh[:, sl] = (r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))).view(S, -1, d)
    return dh, dw, dg


def _nonzero_or_none(g: torch.Tensor | None) -> torch.Tensor | None:
    """An output's incoming gradient in fp32, or None when it is absent or all zero (skipped)."""
    return None if g is None or not bool(g.any()) else g.float()


SINGLE_TILE_ELEMENTS = 1 << 17  # a single-tile chunk's logits: 1 MB of fp32, cache-sized


def _chunks(M: int, V: int, chunk_rows: int | None, chunk_vocab: int | None) -> tuple[int, int]:
    """(rows, vocab) per tile. A small vocabulary is one tile; its chunks then take more rows
    (up to ``SINGLE_TILE_ELEMENTS`` logits), since per-chunk overhead, not the tile, dominates."""
    cv = chunk_vocab or 4096
    if chunk_rows:
        return chunk_rows, cv
    return (max(256, SINGLE_TILE_ELEMENTS // V) if V <= cv else 256), cv


class _Readout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, gn, w, y, eps, inv_t, backend, cm, cv):
        # y stays as given (an expanded [N] is not copied); ignore_index rows are masked below
        if h.numel() == 0:
            lse, best, tgt, ez = (torch.zeros(y.shape, dtype=torch.float32, device=h.device) for _ in range(4))
            arg = torch.zeros(y.shape, dtype=torch.long, device=h.device)
        else:
            lse, best, arg, tgt, ez = _forward(h, gn, w, y, eps, inv_t, backend, cm, cv)
        # the outputs reuse the statistics' buffers: max_lp = best - lse, H = lse - E[z], tgt_lp = z_y - lse
        max_lp, ent = best.sub_(lse), ez.neg_().add_(lse)
        tgt_lp = tgt.sub_(lse).masked_fill_(y == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(h, gn, w, y, arg, lse, ent)
        ctx.cfg = (eps, inv_t, cm, cv)
        ctx.mark_non_differentiable(arg)
        return lse, max_lp, arg, ent, tgt_lp

    @staticmethod
    def backward(ctx, g_lse, g_max, _g_arg, g_ent, g_tgt):
        h, gn, w, y, arg, lse, ent = ctx.saved_tensors
        eps, inv_t, cm, cv = ctx.cfg
        valid = y != IGNORE_INDEX
        ys = y.clamp(min=0)
        ez = lse - ent  # E_p[z]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], gn is not None and ctx.needs_input_grad[1])
        if h.numel() == 0 or not any(needs):
            zeros = [torch.zeros_like(t) if n else None for t, n in zip((h, w, gn), needs)]
            return zeros[0], zeros[2], zeros[1], *[None] * 6
        g_tgt = None if g_tgt is None else g_tgt * valid
        dh, dw, dg = _backward(
            h, gn, w, ys, arg, eps, inv_t, cm, cv, lse, ez, *map(_nonzero_or_none, (g_lse, g_max, g_ent, g_tgt)), needs
        )
        return (
            None if dh is None else dh.to(h.dtype),
            None if dg is None else dg.to(gn.dtype),
            None if dw is None else dw.to(w.dtype),
            *[None] * 6,
        )


def layer_targets(targets: torch.Tensor | None, S: int, N: int, V: int, device) -> torch.Tensor:
    """targets None, [N] (shared by the layers) or [S, N] -> [S, N] long; None -> all ignore_index."""
    if targets is None:
        return torch.full((S, N), IGNORE_INDEX, dtype=torch.long, device=device)
    if targets.shape == (N,):
        y = targets.long()[None].expand(S, N)
    elif targets.shape == (S, N):
        y = targets.long()
    else:
        raise ValueError(f"targets must be [N={N}] or [S={S}, N={N}], got {tuple(targets.shape)}")
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= V))
    if bool(bad.any()):
        raise ValueError(f"targets hold ids outside [0, {V}): {y[bad][:5].tolist()}")
    return y


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
    V = weight.shape[0]
    y = layer_targets(targets, S, N, V, h.device)
    be = pick_backend(backend, h)
    cm, cv = _chunks(S * N, V, chunk_rows, chunk_vocab)
    out = _Readout.apply(h, norm_weight, weight, y, eps, 1.0 / temperature, be, cm, cv)
    if squeeze:
        out = [t[0] for t in out]
    return LayerReadout(*out)  # lse, max_logp, argmax, entropy, target_logp


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
    ys = layer_targets(targets, h.shape[0], h.shape[1], weight.shape[0], h.device)
    outs = []
    for s in range(h.shape[0]):
        x = rms_norm(h[s], norm_weight, eps).to(weight.dtype)
        logits = (x @ weight.T).float() / temperature  # [N, V]
        logp = torch.log_softmax(logits, -1)
        mx, arg = logp.max(-1)
        ent = -(logp.exp() * logp).sum(-1)
        valid = ys[s] != IGNORE_INDEX
        tl = logp.gather(-1, torch.where(valid, ys[s], 0)[:, None]).squeeze(-1) * valid
        outs.append((torch.logsumexp(logits, -1), mx, arg, ent, tl))
    stacked = [torch.stack(t) for t in zip(*outs)]
    if hidden.dim() == 2:
        stacked = [t[0] for t in stacked]
    return LayerReadout(*stacked)
