"""All L layer routers at once: windowed means of every layer's inputs, the L router MLPs and their
loss as one batched computation (no Python loop over layers or windows).

Router l (Dr.LLM) reads the hidden states entering layer l, mean-pooled over up to W contiguous
windows of the prompt's real tokens, and averages its logits over the windows::

    mean_lbw  = sum_t A_btw h_lbt,           A_btw = 1[token t of row b is in window w] / |w|   # [L, B, W, d]
    logits_bl = mean_w (W2_l gelu(W1_l mean_lbw + b1_l) + b2_l)                                # [B, L, 3]

Token with rank k among a row's n real tokens falls in window floor(k * min(W, n) / n); padding
(anywhere) is in no window. The means are one batched matmul of the [B, W, T] window matrix with
the layers' inputs (torch path) or a Triton kernel that reads each hidden state once and keeps the
W window sums in registers (CUDA; ``kernels.triton_exit_head.window_sums``); the MLPs are two
batched contractions over ``[L, d, r]`` and ``[L, r, 3]``. Losses on the [B, L, 3] logits:

    focal:  mean_{b,l} w_{y} (1 - p_y)^gamma (-log p_y)                    (labels y [B, L])

(joint training's router policy loss is the policy's own PPO-clip surrogate: ``rl.trainer.layer_group``)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.backend import Backend, pick_backend


def window_index(mask: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's window ``win [B, T]`` (``num_windows`` for padding) and window sizes ``counts [B, W]``."""
    m = mask.to(torch.long)
    n = m.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    w = n.clamp(max=num_windows)
    rank = (m.cumsum(1) - 1).clamp(min=0)
    win = torch.where(m.bool(), rank * w // n, torch.full_like(rank, num_windows))  # [B, T]
    counts = torch.zeros(mask.shape[0], num_windows + 1, dtype=torch.float32, device=mask.device)
    counts.scatter_add_(1, win, torch.ones_like(win, dtype=torch.float32))
    return win, counts[:, :num_windows]


class _TritonWindowMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, win, counts, num_windows):
        from kernels.triton_exit_head import window_sums

        ctx.save_for_backward(win, counts)
        ctx.dtype = h.dtype
        return window_sums(h, win, num_windows) / counts.clamp(min=1)[None, :, :, None]  # [L, B, W, d]

    @staticmethod
    def backward(ctx, g):  # g [L, B, W, d]
        win, counts = ctx.saved_tensors
        L, B, W, d = g.shape
        scaled = torch.cat([g / counts.clamp(min=1)[None, :, :, None], g.new_zeros(L, B, 1, d)], 2)  # pads -> 0
        idx = win[None, :, :, None].expand(L, B, win.shape[1], d)
        return scaled.gather(2, idx).to(ctx.dtype), None, None, None


def all_layer_window_means(
    layer_inputs: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor,
    num_windows: int,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means of every layer's inputs at once.

    layer_inputs: [L, B, T, d] (or L tensors [B, T, d]); mask [B, T] (1 = real token).
    Returns means [B, L, W, d] fp32 and valid [B, W] (a row with n < W real tokens has n windows)."""
    h = layer_inputs if isinstance(layer_inputs, torch.Tensor) else torch.stack(list(layer_inputs))
    if h.dim() != 4 or h.shape[1:3] != mask.shape:
        raise ValueError(
            f"layer inputs must be [L, B, T, d] with mask [B, T]; got {tuple(h.shape)}, {tuple(mask.shape)}"
        )
    win, counts = window_index(mask, num_windows)
    if pick_backend(backend, h) == "triton":
        means = _TritonWindowMeans.apply(h, win, counts, num_windows)
    else:
        A = F.one_hot(win, num_windows + 1)[..., :num_windows].to(torch.float32)  # [B, T, W]
        A = A / counts.clamp(min=1)[:, None, :]
        means = torch.einsum("btw,lbtd->lbwd", A, h.float())  # one batched matmul over all layers
    return means.transpose(0, 1), counts > 0


def batched_router_logits(
    means: torch.Tensor,
    valid: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """Every router on its layer's window means: means [N, L, W, d], valid [N, W],
    w1 [L, d, r], b1 [L, r], w2 [L, r, A], b2 [L, A] -> logits [N, L, A] (valid windows averaged)."""
    z = F.gelu(torch.einsum("nlwd,ldr->nlwr", means.to(w1.dtype), w1) + b1[None, :, None])  # [N, L, W, r]
    logits = torch.einsum("nlwr,lra->nlwa", z, w2) + b2[None, :, None]  # [N, L, W, A]
    v = valid.to(logits.dtype)[:, None, :, None]  # [N, 1, W, 1]
    return (logits * v).sum(2) / v.sum(2).clamp(min=1)  # [N, L, A]


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class-weighted focal loss, mean over the examples::

        FL = mean_i  w_{y_i} * (1 - p_i) ** gamma * (-log p_i),   p_i = softmax(logits_i)[y_i]

    logits: [..., C]; labels: [...]; weights: [C]. gamma = 0 and unit weights give cross-entropy."""
    C = logits.shape[-1]
    logp = torch.log_softmax(logits.float().reshape(-1, C), -1).gather(1, labels.reshape(-1, 1)).squeeze(1)  # [N]
    p = logp.exp()
    return (weights.to(logp.device)[labels.reshape(-1)] * (1 - p) ** gamma * -logp).mean()


def fused_router_focal_loss(
    layer_inputs: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    gamma: float = 2.0,
    num_windows: int = 8,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routers' focal loss straight from every layer's inputs [L, B, T, d] and labels [B, L]:
    window means, the L MLPs and the loss in one batched pass. Returns (loss, logits [B, L, A])."""
    means, valid = all_layer_window_means(layer_inputs, mask, num_windows, backend)
    logits = batched_router_logits(means, valid, w1, b1, w2, b2)
    return focal_loss(logits, labels, class_weights, gamma), logits
