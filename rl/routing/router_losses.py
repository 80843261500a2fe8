"""Router losses: focal loss with effective-number class weights (pure functions)."""

from __future__ import annotations

import torch


def effective_number_weights(counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Class weights from label counts (Cui et al. 2019)::

        w_c = (1 - beta) / (1 - beta ** n_c),   then scaled so the present classes' weights sum to
                                                 their number; an absent class (n_c = 0) gets 0.

    counts: [C] -> weights [C]."""
    counts = counts.to(torch.float64)
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = (1 - beta) / (1 - beta ** counts[present])
    w = w * present.sum() / w.sum().clamp(min=1e-12)
    return w.to(torch.float32)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class-weighted focal loss, mean over the examples::

        FL = mean_i  w_{y_i} * (1 - p_i) ** gamma * (-log p_i),   p_i = softmax(logits_i)[y_i]

    logits: [N, C]; labels: [N]; weights: [C]. gamma = 0 and unit weights give cross-entropy."""
    logp = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)  # [N]
    p = logp.exp()
    return (weights.to(logp.device)[labels] * (1 - p) ** gamma * -logp).mean()
