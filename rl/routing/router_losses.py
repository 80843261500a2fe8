"""Router losses: effective-number class weights; the focal loss itself is batched over layers in
``kernels.batched_routers`` (re-exported here for the router training)."""

from __future__ import annotations

import torch

from kernels.batched_routers import focal_loss

__all__ = ["effective_number_weights", "focal_loss"]


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
