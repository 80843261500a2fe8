"""S-GRPO / GRPO math as small pure functions, registered by name so a recipe can pick them.

Shapes: B sequences, T completion tokens (right-padded), G members in a group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rollout.types import ANSWER, EXIT_PROMPT, THINK

# ---------------------------------------------------------------------------------- advantages

ADVANTAGES: dict[str, Callable[..., list[float]]] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


@register_advantage("sgrpo")
def serial_group_advantages(rewards: Sequence[float]) -> list[float]:
    """S-GRPO: A_i = r_i - mean(r) over the serial group (no division by the std)."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


@register_advantage("grpo")
def grpo_advantages(rewards: Sequence[float], scale_std: bool = True, eps: float = 1e-6) -> list[float]:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps) with the population std; without
    ``scale_std`` (Dr. GRPO) just r_i - mean(r)."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale_std:
        return centred
    std = (sum(c * c for c in centred) / len(rewards)) ** 0.5
    return [c / (std + eps) for c in centred]


def get_advantage(name: str) -> Callable[..., list[float]]:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}") from None


# ---------------------------------------------------------------------------------- loss masks


def loss_mask(regions: Sequence[int], is_full: bool) -> list[int]:
    """Which completion tokens of one member carry the loss: the full rollout trains on its whole
    completion (its thinking is what S-GRPO shortens); an exit branch on its generated answer only
    (the kept prefix was sampled by the full rollout, the exit prompt was inserted)."""
    if is_full:
        return [1] * len(regions)
    return [int(r == ANSWER) for r in regions]


EXIT_ANSWERS = ("all", "correct_only")


def exit_branch_mask(regions: Sequence[int], correct: bool, which: str) -> list[int]:
    """Loss mask of an exit branch: its answer (``loss_mask``), and with ``which = "correct_only"``
    nothing at all for a wrong exit.

    A forced answer before the computation is done cannot be right (the model answers with what its
    thinking had reached, as it was taught to); its negative advantage pushes down the value the
    thinking computed, which teaches the policy to distrust its own arithmetic (measured: training on
    exit answers alone costs 7 points, step lines miscomputed). Correct exits still carry their
    positive advantage; the shortening comes from the full rollout's negative one.
    """
    if which not in EXIT_ANSWERS:
        raise ValueError(f"unknown exit_answers {which!r}; known: {EXIT_ANSWERS}")
    if which == "correct_only" and not correct:
        return [0] * len(regions)
    return loss_mask(regions, False)


def truncated_is_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, sampled: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling for the sampler/learner mismatch (vLLM vs the trainer).

    raw_t = exp(old_logp_t - sampler_logp_t) on tokens the sampler drew (1 elsewhere)   # [B, T]
    w_t   = min(raw_t, cap)
    Returns (w, raw); log raw before clipping to watch the mismatch.
    """
    raw = torch.where(sampled.bool(), torch.exp(old_logp - sampler_logp), torch.ones_like(old_logp))
    return raw.clamp(max=cap), raw


def masked_aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Aggregate per-token ``x`` [B, T] under ``mask`` [B, T].

    token-mean:          sum(x m) / sum(m)                      (DAPO, Dr. GRPO style)
    seq-mean-token-mean: mean_b [ sum_t(x m) / sum_t(m) ]       (original GRPO)
    seq-mean-token-sum:  mean_b [ sum_t(x m) ]                   (no length normalisation)
    """
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
        has = (m.sum(-1) > 0).to(x.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return (x * m).sum(-1).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def aggregation_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights W [B, T] with masked_aggregate(x, mask, mode) == sum(x * W) for every x:
    the form a fused, chunked loss needs (a plain sum over tokens).

    token-mean:          m / sum(m)
    seq-mean-token-mean: m / (sum_t m  *  #sequences with a masked token)
    seq-mean-token-sum:  m / B
    """
    m = mask.float()
    if mode == "token-mean":
        return m / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = m.sum(-1, keepdim=True)  # [B, 1]
        n_seq = (per_seq > 0).float().sum().clamp(min=1)
        return m / per_seq.clamp(min=1) / n_seq
    if mode == "seq-mean-token-sum":
        return m / max(1, m.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}")


def ppo_clip_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2
) -> torch.Tensor:
    """Per-token PPO-clip term, any shape (advantages broadcast to logp's):

    rho = exp(logp - old_logp);  L = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
    """
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)


@torch.no_grad()
def ppo_clip_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> dict[str, float]:
    """Clip fraction and ratio mean / max over the masked tokens ([B, T] inputs, advantages [B])."""
    adv = advantages.unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    m = mask.bool()
    was_clipped = (clipped < unclipped) & m
    n = m.sum().clamp(min=1)
    return {
        "clip_frac": float(was_clipped.sum() / n),
        "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
        "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
    }


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate (Schulman's k3): exp(ref - logp) - (ref - logp) - 1, >= 0.  # [B, T]"""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


__all__ = [
    "ADVANTAGES",
    "ANSWER",
    "EXIT_PROMPT",
    "EXIT_ANSWERS",
    "aggregation_weights",
    "exit_branch_mask",
    "THINK",
    "get_advantage",
    "grpo_advantages",
    "kl_k3",
    "loss_mask",
    "masked_aggregate",
    "ppo_clip_stats",
    "ppo_clip_token_loss",
    "register_advantage",
    "serial_group_advantages",
    "truncated_is_weights",
]
