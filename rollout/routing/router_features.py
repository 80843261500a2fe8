"""The routers' inputs: window means of the hidden states entering every layer, each prompt
teacher-forced under its plan. One definition for offline router training (label plans,
``rl.routing.router_training``) and joint training (sampled plans, ``rl.trainer.layer_group``)."""

from __future__ import annotations

import torch

from kernels.batched_routers import all_layer_window_means
from rollout.routing.routed_generation import left_pad
from rollout.routing.routed_model import RoutedModel


@torch.no_grad()
def router_features(
    routed: RoutedModel,
    prompts: list[list[int]],
    plans: torch.Tensor,
    num_windows: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means of the hidden states entering every layer under each prompt's plan, in
    batches of ``batch_size`` prompts. Returns means [N, L, W, d] and valid [N, W] on the CPU."""
    means, valid = [], []
    for s in range(0, len(prompts), batch_size):
        m, v = plan_window_means(routed, prompts[s : s + batch_size], plans[s : s + batch_size], num_windows)
        means.append(m.cpu())
        valid.append(v.cpu())
    return torch.cat(means), torch.cat(valid)


@torch.no_grad()
def plan_window_means(
    routed: RoutedModel,
    prompts: list[list[int]],
    plans: torch.Tensor,
    num_windows: int,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routers' inputs for prompts teacher-forced under their plans [b, L]: window means of the
    hidden states entering every layer [b, L, W, d] and valid [b, W]."""
    ids, attn = left_pad(prompts, pad_id, routed.device)
    out = routed(ids, attn, plan=plans.to(routed.device), output_layer_inputs=True, lm_head=False)
    return all_layer_window_means(out.layer_inputs, attn, num_windows)
