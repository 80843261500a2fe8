"""Policy log-probs (and entropy) straight from hidden states, never materialising [N, V] logits.

    z      = hidden @ weight.T / T                      # [N, V], only ever built tile by tile
    logp_i = z[i, y_i] - logsumexp_j z[i, j]            # [N]
    H_i    = logsumexp_j z[i, j] - sum_j p_ij z[i, j]   # [N], p = softmax(z)

Forward keeps, per token, the running max ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) z``
(an online log-sum-exp over vocabulary tiles). Backward recomputes each tile of ``z`` and uses

    dL/dz_ij = g_i (1[j = y_i] - p_ij)  +  gH_i (-p_ij (z_ij - E_i)),   E_i = sum_j p_ij z_ij
    dL/dhidden = (dL/dz) @ weight / T,  dL/dweight = (dL/dz).T @ hidden / T

so memory beyond inputs and their gradients is O(tile), not O(N V). Two implementations share this
driver: an exact chunked torch path (CPU, and any device) and Triton kernels on CUDA for the
per-row softmax statistics and the in-place logit gradient (``kernels.triton_logprob``).
"""

from __future__ import annotations

import math

import torch

from kernels.backend import Backend, pick_backend

IGNORE_INDEX = -100


def _chunk_sizes(
    n: int, v: int, d: int, backend: str, chunk_tokens: int | None, chunk_vocab: int | None
) -> tuple[int, int]:
    if backend == "triton":
        # Liger-style: tokens per [Cn, V] fp32 tile ~ N / ceil(V / d), so the tile is about the size
        # of hidden; clamped so matmuls stay large enough to be efficient.
        cn = chunk_tokens or min(
            1024, max(64, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / math.ceil(v / d)))))))
        )
        return cn, v
    return chunk_tokens or 256, chunk_vocab or 4096


def _tile_logits(h: torch.Tensor, w: torch.Tensor, inv_t: float) -> torch.Tensor:
    """[Cn, Cv] fp32 logits of one tile (fp32 accumulation for bf16 inputs)."""
    if h.dtype != torch.float32:
        h, w = h.float(), w.float()
    z = h @ w.T
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def _forward_torch(hidden, weight, targets, inv_t, cn, cv):
    n, v = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    ez = torch.empty(n, dtype=torch.float32, device=hidden.device)  # E_p[z]
    for a in range(0, n, cn):
        h = hidden[a : a + cn]
        y = targets[a : a + cn]
        m = torch.full((h.shape[0],), -float("inf"), dtype=torch.float32, device=h.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for b in range(0, v, cv):
            z = _tile_logits(h, weight[b : b + cv], inv_t)  # [Cn, Cv]
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(dim=1)
            t = t * scale + (e * z).sum(dim=1)
            m = m_new
            hit = (y >= b) & (y < b + z.shape[1])
            if hit.any():
                rows = hit.nonzero(as_tuple=True)[0]
                tgt[a + rows] = z[rows, y[rows] - b]
        lse[a : a + cn] = m + torch.log(s)
        ez[a : a + cn] = t / s
    return lse, tgt, ez


def _backward_torch(hidden, weight, targets, inv_t, cn, cv, lse, ez, g_logp, g_ent, need_dh, need_dw):
    n, v = hidden.shape[0], weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    for a in range(0, n, cn):
        h = hidden[a : a + cn]
        hf = h.float()
        y = targets[a : a + cn]
        g = g_logp[a : a + cn]
        gh = g_ent[a : a + cn] if g_ent is not None else None
        for b in range(0, v, cv):
            wb = weight[b : b + cv]
            z = _tile_logits(h, wb, inv_t)
            p = torch.exp(z - lse[a : a + cn, None])
            if gh is not None:
                gz = -p * (g[:, None] + gh[:, None] * (z - ez[a : a + cn, None]))
            else:
                gz = p.mul_(-g[:, None])
            hit = (y >= b) & (y < b + z.shape[1])
            if hit.any():
                rows = hit.nonzero(as_tuple=True)[0]
                gz[rows, y[rows] - b] += g[rows]
            if inv_t != 1.0:
                gz.mul_(inv_t)
            if dh is not None:
                dh[a : a + cn] += gz @ wb.float()
            if dw is not None:
                dw[b : b + cv] += gz.T @ hf
    return dh, dw


def _forward_triton(hidden, weight, targets, inv_t, cn):
    from kernels.triton_logprob import row_stats

    n = hidden.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    tgt = torch.empty_like(lse)
    ez = torch.empty_like(lse)
    for a in range(0, n, cn):
        z = _tile_logits(hidden[a : a + cn], weight, inv_t)  # [Cn, V] fp32
        row_stats(z, targets[a : a + cn], lse[a : a + cn], tgt[a : a + cn], ez[a : a + cn])
    return lse, tgt, ez


def _backward_triton(hidden, weight, targets, inv_t, cn, lse, ez, g_logp, g_ent, need_dh, need_dw):
    from kernels.triton_logprob import logit_grad_

    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    wf = weight.float() if weight.dtype != torch.float32 else weight
    for a in range(0, hidden.shape[0], cn):
        h = hidden[a : a + cn]
        z = _tile_logits(h, weight, inv_t)
        logit_grad_(
            z,
            targets[a : a + cn],
            lse[a : a + cn],
            ez[a : a + cn],
            g_logp[a : a + cn],
            None if g_ent is None else g_ent[a : a + cn],
            inv_t,
        )
        if dh is not None:
            dh[a : a + cn] = z @ wf
        if dw is not None:
            dw.addmm_(z.T, h.float())
    return dh, dw


def check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, backend: Backend
) -> str:
    """Shapes and temperature of a fused call, named when wrong; returns the backend to run."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return pick_backend(backend, hidden)


class FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, backend, chunk_tokens, chunk_vocab):
        inv_t = 1.0 / temperature
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        n, v, d = hidden.shape[0], weight.shape[0], hidden.shape[1]
        cn, cv = _chunk_sizes(n, v, d, backend, chunk_tokens, chunk_vocab)
        if n == 0:
            lse = tgt = ez = hidden.new_zeros(0, dtype=torch.float32)
        elif backend == "triton":
            lse, tgt, ez = _forward_triton(hidden, weight, safe_targets, inv_t, cn)
        else:
            lse, tgt, ez = _forward_torch(hidden, weight, safe_targets, inv_t, cn, cv)
        logp = torch.where(valid, tgt - lse, torch.zeros_like(lse))
        entropy = torch.where(valid, lse - ez, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, ez)
        ctx.cfg = (inv_t, backend, cn, cv)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, valid, lse, ez = ctx.saved_tensors
        inv_t, backend, cn, cv = ctx.cfg
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if hidden.shape[0] == 0 or not (need_dh or need_dw):
            dh = torch.zeros_like(hidden) if need_dh else None
            return (dh, torch.zeros_like(weight) if need_dw else None, *[None] * 6)
        g = torch.zeros_like(lse) if g_logp is None else g_logp.float() * valid
        ge = None if g_ent is None else g_ent.float() * valid
        if ge is not None and not bool(ge.any()):
            ge = None
        if backend == "triton":
            dh, dw = _backward_triton(hidden, weight, targets, inv_t, cn, lse, ez, g, ge, need_dh, need_dw)
        else:
            dh, dw = _backward_torch(hidden, weight, targets, inv_t, cn, cv, lse, ez, g, ge, need_dh, need_dw)
        dh = None if dh is None else dh.to(hidden.dtype)
        return (dh, None if dw is None else dw.to(weight.dtype), *[None] * 6)


def fused_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
):
    """log p(targets | hidden) under the LM head ``weight`` at ``temperature``.

    hidden [N, d], weight [V, d] (tied or not), targets [N] (``ignore_index`` rows give 0 and no
    gradient) -> logp [N] fp32 (and entropy [N] fp32 when ``return_entropy``). fp32 or bf16 inputs,
    fp32 accumulation. ``backend``: 'auto' (Triton on CUDA, torch otherwise), 'torch', 'triton'.
    """
    be = check_inputs(hidden, weight, targets, temperature, backend)
    logp, ent = FusedLogprob.apply(
        hidden, weight, targets.long(), float(temperature), ignore_index, be, chunk_tokens, chunk_vocab
    )
    return (logp, ent) if return_entropy else logp


def naive_logprob(
    hidden, weight, targets, temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = IGNORE_INDEX
):
    """Reference: full [N, V] logits, log_softmax, gather (what most trainers do)."""
    logits = (hidden.float() @ weight.float().T) / temperature
    logps = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    out = logps.gather(-1, safe[:, None]).squeeze(-1) * valid
    if return_entropy:
        ent = -(logps.exp() * logps).sum(-1) * valid
        return out, ent
    return out
