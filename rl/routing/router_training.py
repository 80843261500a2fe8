"""Offline router training from search labels (Dr.LLM): the base model frozen, teacher forcing with
the label plans, focal loss with effective-number class weights, AdamW, warmup + cosine.

Teacher forcing: the prompt runs once under its label plan, and router ``l`` learns from the hidden
states that enter layer ``l`` under that plan (mean-pooled over the prompt's windows). The model is
frozen, so those features are computed once and the routers train on them for many epochs at the
cost of a few small matrix products.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from rl.routing.router_losses import effective_number_weights, focal_loss
from rollout.routing.routers import NUM_ACTIONS, LayerRouters, RouterConfig

ACTION_NAMES = ("skip", "execute", "repeat")


@dataclass
class RouterTrainConfig:
    """How routers learn from labels."""

    epochs: int = field(default=60, metadata={"help": "passes over the labelled prompts"})
    batch_size: int = field(default=64, metadata={"help": "prompts per optimizer step (all layers each)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.05, metadata={"help": "share of the steps spent warming up (then cosine)"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    class_beta: float = field(default=0.999, metadata={"help": "effective-number beta of the class weights"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "share of labelled prompts kept for F1"})
    router_hidden: int = field(default=128, metadata={"help": "router MLP width"})
    num_windows: int = field(default=8, metadata={"help": "prompt windows each router pools over"})
    seed: int = field(default=0, metadata={"help": "seed of the split, init and batch order"})


def per_class_f1(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float | None]:
    """F1 of each action over all (prompt, layer) decisions; None where the class never occurs."""
    out: dict[str, float | None] = {}
    for c, name in enumerate(ACTION_NAMES):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        out[name] = None if tp + fn == 0 else round(2 * tp / max(1, 2 * tp + fp + fn), 4)
    return out


def train_routers(
    means: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, cfg: RouterTrainConfig, log=None
) -> tuple[LayerRouters, dict]:
    """Routers fitted to ``labels`` [N, L] from features ``means`` [N, L, W, d], ``valid`` [N, W];
    returns the routers and the metrics (loss curve, held-out per-class F1 and accuracy)."""
    N, L, W, d = means.shape
    order = list(range(N))
    random.Random(cfg.seed).shuffle(order)
    n_held = int(round(N * cfg.heldout_fraction)) if N >= 10 else 0
    held, train = torch.tensor(order[:n_held], dtype=torch.long), torch.tensor(order[n_held:], dtype=torch.long)
    torch.manual_seed(cfg.seed)
    routers = LayerRouters(RouterConfig(L, d, cfg.router_hidden, cfg.num_windows))
    counts = torch.bincount(labels[train].flatten(), minlength=NUM_ACTIONS)
    weights = effective_number_weights(counts, cfg.class_beta)
    opt = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
    )
    g = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for epoch in range(cfg.epochs):
        perm = train[torch.randperm(len(train), generator=g)]
        epoch_loss = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            logits = routers.all_window_logits(means[idx], valid[idx])  # [b, L, 3]
            loss = focal_loss(logits.reshape(-1, NUM_ACTIONS), labels[idx].reshape(-1), weights, cfg.focal_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
        curve.append(epoch_loss / max(1, len(train)))
        if log and (epoch % 10 == 0 or epoch == cfg.epochs - 1):
            log(f"routers epoch {epoch}: focal loss {curve[-1]:.4f}")
    routers.eval()
    metrics = {
        "train_prompts": len(train),
        "heldout_prompts": len(held),
        "class_weights": [round(float(w), 4) for w in weights],
        "loss_curve": [round(x, 5) for x in curve],
        "final_loss": curve[-1] if curve else None,
    }
    for name, idx in (("train", train), ("heldout", held)):
        if len(idx) == 0:
            continue
        with torch.no_grad():
            pred = routers.all_window_logits(means[idx], valid[idx]).argmax(-1)
        metrics[f"{name}_f1"] = per_class_f1(pred, labels[idx])
        metrics[f"{name}_accuracy"] = round(float((pred == labels[idx]).float().mean()), 4)
        metrics[f"{name}_plan_exact"] = round(float((pred == labels[idx]).all(-1).float().mean()), 4)
    return routers, metrics
