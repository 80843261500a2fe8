"""Reference implementations the tests compare the library's fused and batched losses against."""

from __future__ import annotations

import torch

from kernels.fused_logprob import IGNORE_INDEX, naive_logprob
from kernels.fused_policy_loss import TokenLoss
from rl.trainer.core_algos import masked_aggregate, ppo_clip_stats, ppo_clip_token_loss


def ppo_clip_loss(
    logp: torch.Tensor,  # [B, T] learner log-probs (with grad)
    old_logp: torch.Tensor,  # [B, T] learner log-probs at rollout time
    advantages: torch.Tensor,  # [B] one advantage per member, broadcast over its tokens
    mask: torch.Tensor,  # [B, T] 1 where the loss applies
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,  # [B, T] truncated IS weights (no grad)
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy loss:

    rho_t = exp(logp_t - old_logp_t)
    L_t   = -w_t * min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)
    loss  = aggregate(L, mask)
    """
    adv = advantages.unsqueeze(-1)  # [B, 1]
    per_token = ppo_clip_token_loss(logp, old_logp, adv, clip_low, clip_high)  # [B, T]
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = masked_aggregate(per_token, mask, agg)
    return loss, ppo_clip_stats(logp, old_logp, advantages, mask, clip_low, clip_high)


def naive_policy_loss(
    hidden, weight, targets, token_loss: TokenLoss, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
):
    """Reference: ``naive_logprob`` (full [N, V] logits, log_softmax, gather), then the same per-token loss."""
    logp, ent = naive_logprob(hidden, weight, targets, temperature, return_entropy=True, ignore_index=ignore_index)
    loss = token_loss(logp, ent, slice(0, hidden.shape[0])).float().sum()
    return loss, logp.detach(), ent.detach()
