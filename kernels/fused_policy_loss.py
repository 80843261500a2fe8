"""A policy loss straight from hidden states and the LM head, gradients computed in the forward pass.

``kernels.fused_logprob`` returns per-token log-probs whose upstream gradient is unknown until
backward, so its backward must recompute every logits tile: 4 matmuls against the naive path's 3.
A policy loss that is a sum of per-token terms removes that: once ``logp_i`` (and ``H_i``) of a
token chunk are known, so is ``g_i = dL/dlogp_i`` (and ``gH_i = dL/dH_i``), and each chunk is done
in one pass (Liger-Kernel's fused-linear trick):

    z   = hidden_c @ weight.T / T                                    # [Cn, V] (stored [V, Cn] on CPU), one tile
    lse, logp = logsumexp(z), z[y] - lse;  H = lse - sum_j p_j z_j    # [Cn]
    L_c = sum_i token_loss(logp, H)_i;  (g, gH) = autograd of L_c       # [Cn], [Cn]
    dz  = (g (onehot(y) - p) - gH p (z - E_p[z])) / T                   # [Cn, V], in place of z
    dhidden_c = dz @ weight;  dweight += dz.T @ hidden_c                # the 2 remaining matmuls

3 matmuls and one ``[Cn, V]`` fp32 tile at a time. The gradients are held from forward to backward,
where they are scaled by the incoming gradient of the (scalar) loss.

``token_loss(logp, entropy, rows)`` gets the chunk's log-probs and entropies ``[n]`` (leaf tensors
that require grad) and the ``slice`` of token rows they belong to, and returns the chunk's per-token
loss ``[n]``; the total loss is the sum over all tokens. Any aggregation (token-mean, per-sequence
means) is a per-token weight the caller folds in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.backend import Backend
from kernels.fused_logprob import IGNORE_INDEX, _chunk_sizes, check_inputs

TokenLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]

CHUNK_TOKENS_CPU = 256  # a [151936, 256] fp32 tile is 148 MiB; 256 columns keep CPU GEMMs at full speed
VOCAB_BLOCK = 8192  # the torch path's elementwise work, in cache-sized blocks of vocabulary rows


def _chunk_tokens(n: int, v: int, d: int, backend: str, chunk_tokens: int | None) -> int:
    if chunk_tokens:
        return chunk_tokens
    if backend == "triton":
        return _chunk_sizes(n, v, d, backend, None, None)[0]
    return CHUNK_TOKENS_CPU


# ---- the three matmuls, on a vocabulary-major view zv [V, k] of the tile (contiguous on the torch
# path, the transpose of a contiguous [k, V] tile on the Triton path) ----


def _weight_blocks(weight: torch.Tensor):
    """Row blocks of a non-fp32 ``weight`` converted to fp32 (~32 MB each), never the whole matrix."""
    rows = max(1024, (1 << 23) // weight.shape[1])
    for b in range(0, weight.shape[0], rows):
        yield b, weight[b : b + rows].float()


def _logits_into(zv: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
    """zv [V, k] fp32 <- weight @ h.T with fp32 accumulation."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        if zv.is_contiguous():
            torch.mm(weight, h.t(), out=zv)
        else:
            torch.mm(h, weight.t(), out=zv.t())
        return
    hf = h.float()
    for b, wb in _weight_blocks(weight):
        zv[b : b + wb.shape[0]] = wb @ hf.t()


def _hidden_grad_into(dh: torch.Tensor, gv: torch.Tensor, weight: torch.Tensor) -> None:
    """dh [k, d] fp32 <- gv.T @ weight."""
    if weight.dtype == torch.float32:
        torch.mm(gv.t(), weight, out=dh)
        return
    dh.zero_()
    for b, wb in _weight_blocks(weight):
        dh.addmm_(gv[b : b + wb.shape[0]].t(), wb)


def _weight_grad_add(dw: torch.Tensor | None, gv: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dw [V, d] fp32 += gv @ h (the first chunk writes instead of zero-fill + add)."""
    hf = h if h.dtype == torch.float32 else h.float()
    if dw is None:
        return gv @ hf
    return dw.addmm_(gv, hf)


# ---- the per-token statistics and the logit gradient, torch path (vocabulary-major tile) ----


def _stats_torch(zv: torch.Tensor, scratch: torch.Tensor, inv_t: float):
    """Scale ``zv [V, k]`` by 1/T in place; return lse, E_p[z] [k] (online over vocabulary blocks)."""
    v, k = zv.shape
    m = torch.full((k,), -float("inf"), dtype=torch.float32, device=zv.device)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    for b in range(0, v, VOCAB_BLOCK):
        zb = zv[b : b + VOCAB_BLOCK]  # [cv, k]
        if inv_t != 1.0:
            zb.mul_(inv_t)
        e = scratch[: zb.numel()].view(zb.shape)
        m_new = torch.maximum(m, zb.amax(dim=0))
        scale = torch.exp(m - m_new)
        torch.sub(zb, m_new, out=e).exp_()
        s = s * scale + e.sum(dim=0)
        t = t * scale + e.mul_(zb).sum(dim=0)
        m = m_new
    return m + torch.log(s), t / s


def _logit_grad_torch(zv: torch.Tensor, scratch: torch.Tensor, y, lse, ez, g, ge) -> None:
    """Overwrite ``zv`` (scaled logits) with dL/dz; ``g``/``ge`` already carry the 1/T factor."""
    v, k = zv.shape
    for b in range(0, v, VOCAB_BLOCK):
        zb = zv[b : b + VOCAB_BLOCK]
        if ge is None:
            zb.sub_(lse).exp_().mul_(-g)  # -g p
        else:
            p = torch.sub(zb, lse, out=scratch[: zb.numel()].view(zb.shape)).exp_()
            zb.sub_(ez).mul_(ge).add_(g).mul_(p).neg_()  # -p (g + gH (z - E))
    zv[y, torch.arange(k, device=zv.device)] += g  # + g onehot(y)


class FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss, temperature, ignore_index, backend, chunk_tokens):
        n, d = hidden.shape
        v = weight.shape[0]
        inv_t = 1.0 / temperature
        valid = targets != ignore_index
        y_all = torch.where(valid, targets, torch.zeros_like(targets))
        logp_all = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        ent_all = torch.zeros_like(logp_all)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = None
        triton = backend == "triton"
        if triton:
            from kernels.triton_logprob import logit_grad_, row_stats
        cn = _chunk_tokens(n, v, d, backend, chunk_tokens)
        # one flat buffer: a contiguous [V, k] (torch) or [k, V] (Triton) tile for every chunk size k
        tile = torch.empty(v * min(cn, n), dtype=torch.float32, device=hidden.device)
        scratch = (
            None if triton else torch.empty(min(VOCAB_BLOCK, v) * min(cn, n), dtype=torch.float32, device=hidden.device)
        )
        for a in range(0, n, cn):
            rows = slice(a, min(n, a + cn))
            h = hidden[rows]
            y, ok = y_all[rows], valid[rows]
            k = h.shape[0]
            zv = tile[: v * k].view(k, v).t() if triton else tile[: v * k].view(v, k)  # [V, k]
            _logits_into(zv, h, weight)  # matmul 1
            if triton:
                z = zv.t()  # [k, V] contiguous
                if inv_t != 1.0:
                    z.mul_(inv_t)
                lse, tgt, ez = (torch.empty(k, dtype=torch.float32, device=z.device) for _ in range(3))
                row_stats(z, y, lse, tgt, ez)
            else:
                lse, ez = _stats_torch(zv, scratch, inv_t)
                tgt = zv[y, torch.arange(k, device=zv.device)]
            logp = torch.where(ok, tgt - lse, torch.zeros_like(lse))
            ent = torch.where(ok, lse - ez, torch.zeros_like(lse))
            logp_all[rows], ent_all[rows] = logp, ent
            with torch.enable_grad():
                lp = logp.detach().requires_grad_()
                en = ent.detach().requires_grad_()
                chunk_loss = token_loss(lp, en, rows)
                if chunk_loss.shape != (k,):
                    raise ValueError(f"token_loss must return one loss per token [{k}], got {tuple(chunk_loss.shape)}")
                chunk_loss = chunk_loss.float().sum()
                g, ge = torch.autograd.grad(chunk_loss, (lp, en), allow_unused=True)
            loss += chunk_loss.detach()
            if not (need_dh or need_dw):
                continue
            g = torch.zeros_like(lse) if g is None else g.float() * ok
            ge = None if ge is None or not bool(ge.any()) else ge.float() * ok
            if triton:
                logit_grad_(zv.t(), y, lse, ez, g, ge, inv_t)
            else:
                _logit_grad_torch(zv, scratch, y, lse, ez, g * inv_t, None if ge is None else ge * inv_t)
            if need_dh:
                _hidden_grad_into(dh[rows], zv, weight)  # matmul 2
            if need_dw:
                dw = _weight_grad_add(dw, zv, h)  # matmul 3
        if need_dw and dw is None:
            dw = torch.zeros((v, d), dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp_all, ent_all)
        return loss, logp_all, ent_all

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "fused_policy_loss: the gradients were computed in forward and scaled in place; backward runs once"
            )
        ctx.consumed = True
        dh, dw = ctx.saved_tensors
        scale = None if g_loss.numel() == 1 and float(g_loss) == 1.0 else g_loss.float()
        grads = []
        for grad, dt in ((dh, ctx.dtypes[0]), (dw, ctx.dtypes[1])):
            if grad is not None and scale is not None:
                grad.mul_(scale)  # in place: these buffers are ours, and dw is weight-sized
            grads.append(None if grad is None else grad.to(dt))
        return (*grads, None, None, None, None, None, None)


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss: TokenLoss,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: Backend = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i token_loss(logp, H)_i with logp_i = log softmax(hidden_i @ weight.T / T)[targets_i].

    hidden [N, d], weight [V, d], targets [N] (``ignore_index`` rows get logp = H = 0 and no
    gradient) -> (loss [] fp32 with gradients for hidden and weight, logp [N], entropy [N]; the
    last two detached, for metrics). fp32 or bf16 inputs, fp32 accumulation. Never holds [N, V].
    """
    be = check_inputs(hidden, weight, targets, temperature, backend)
    return FusedPolicyLoss.apply(
        hidden, weight, targets.long(), token_loss, float(temperature), ignore_index, be, chunk_tokens
    )
