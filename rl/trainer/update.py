"""The policy update of one step: ``optim.epochs`` x ``optim.mini_batches`` optimizer steps of
PPO-clip over a learner batch packed into micro-batches by token count.

    plan micro-batches -> old / reference log-probs (no grad) -> for each mini-batch:
    micro-batch losses (fused from hidden states) -> backward -> clip -> optimizer step
"""

from __future__ import annotations

import contextlib
import random
import statistics
from dataclasses import dataclass, field

import torch

from rl.trainer.config import TrainConfig
from rl.trainer.core_algos import aggregation_weights, kl_k3, masked_aggregate, ppo_clip_stats, truncated_is_weights
from rl.trainer.learner import LearnerBatch, PolicyTokenLoss, collate, pack_micro_batches, scatter_tokens


@dataclass
class Update:
    """What one policy update works with."""

    policy: torch.nn.Module  # PolicyLogprobs, prepared by accelerate
    accelerator: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: TrainConfig
    pad_id: int
    ref_policy: torch.nn.Module | None = None

    @property
    def temperature(self) -> float:
        t = self.cfg.rollout.temperature
        return t if t > 0 else 1.0


@dataclass
class LearnStats:
    values: dict[str, list[float]] = field(
        default_factory=lambda: {
            k: []
            for k in (
                "clip_frac",
                "ratio_max",
                "is_raw_mean",
                "is_raw_max",
                "is_raw_min",
                "entropy",
                "kl",
                "loss",
                "grad_norm",
            )
        }
    )
    nonfinite: int = 0

    def add(self, **kv: float) -> None:
        for k, v in kv.items():
            self.values[k].append(v)


def _token_order(slots: torch.Tensor):
    """[b, Tc] completion-layout tensor -> [N] in the flat token order of ``slots``."""
    return lambda x: x.reshape(-1)[slots]


def plan_micro_batches(u: Update, lb: LearnerBatch) -> tuple[LearnerBatch, list[list[int]]]:
    """Micro-batches of at most ``optim.micro_batch_tokens``. With several ranks every rank must run
    the same number of backward passes (DDP/FSDP/ZeRO all-reduce in them): ranks with less work pad
    with an empty micro-batch whose loss mask is all zero."""
    acc = u.accelerator
    micro = pack_micro_batches([len(x) for x in lb.input_ids], u.cfg.optim.micro_batch_tokens) if len(lb) else []
    if acc.num_processes > 1:
        most = int(acc.gather(torch.tensor([len(micro)], device=acc.device)).max())
        if len(micro) < most:
            p = u.pad_id
            lb = LearnerBatch(
                lb.input_ids + [[p, p]],
                lb.prompt_lens + [1],
                lb.mask + [[0]],
                lb.sampled + [[0]],
                lb.sampler_logp + [[0.0]],
                lb.advantages + [0.0],
                plans=None if lb.plans is None else lb.plans + [None],
            )
            micro += [[len(lb) - 1]] * (most - len(micro))
    return lb, micro


@torch.no_grad()
def frozen_logprobs(u: Update, lb: LearnerBatch, micro: list[list[int]], need_old: bool):
    """Per micro-batch ``[b, Tc]`` log-probs of the policy before the update (when several optimizer
    steps follow) and of the reference policy (when a KL term is on)."""
    old: dict[int, torch.Tensor] = {}
    ref: dict[int, torch.Tensor] = {}
    for mi, idx in enumerate(micro):
        t = collate(lb.select(idx), u.pad_id, u.accelerator.device)
        shape = tuple(t["completion_mask"].shape)
        args = (t["input_ids"], t["attention_mask"], t["positions"], t["targets"], u.temperature)
        if need_old:
            old[mi] = scatter_tokens(u.policy(*args, plans=t["plans"])[0], t["slots"], shape)
        if u.ref_policy is not None:
            ref[mi] = scatter_tokens(u.ref_policy(*args, plans=t["plans"])[0], t["slots"], shape)
    return old, ref


def micro_batch_backward(
    u: Update, t: dict, old: torch.Tensor | None, ref: torch.Tensor | None, share: float, stats: LearnStats
) -> bool:
    """Loss of one collated micro-batch, scaled by its share of the mini-batch, backpropagated;
    metrics from the detached log-probs. Returns False when the loss was not finite (it is still
    backpropagated, so every rank keeps the same collectives)."""
    L = u.cfg.loss
    shape = tuple(t["completion_mask"].shape)
    sampled = t["sampled"] * t["completion_mask"]  # [b, Tc]
    flat = _token_order(t["slots"])
    token_loss = PolicyTokenLoss(
        weight=flat(aggregation_weights(t["loss_mask"], L.aggregation)),
        advantages=t["advantages"][t["slots"] // shape[1]],
        clip_low=L.clip_low,
        clip_high=L.clip_high,
        old_logp=flat(old) if old is not None else None,
        sampler_logp=flat(t["sampler_logp"]),
        sampled=flat(sampled),
        tis_cap=L.tis_cap,
        ref_logp=flat(ref) if ref is not None else None,
        kl_coef=L.kl_coef,
    )
    loss, lp, ent = u.policy(
        t["input_ids"],
        t["attention_mask"],
        t["positions"],
        t["targets"],
        u.temperature,
        token_loss=token_loss,
        plans=t["plans"],
    )
    finite = bool(torch.isfinite(loss))
    u.accelerator.backward(loss * share)
    with torch.no_grad():
        logp = scatter_tokens(lp, t["slots"], shape)  # [b, Tc]
        old_logp = old if old is not None else logp
        if L.tis_cap is not None:
            _, raw = truncated_is_weights(old_logp, t["sampler_logp"], sampled, L.tis_cap)
            m = sampled.bool()
            if m.any():
                stats.add(
                    is_raw_mean=float(raw[m].mean()), is_raw_max=float(raw[m].max()), is_raw_min=float(raw[m].min())
                )
        s = ppo_clip_stats(logp, old_logp, t["advantages"], t["loss_mask"], L.clip_low, L.clip_high)
        if ref is not None:
            stats.add(kl=float(masked_aggregate(kl_k3(logp, ref), t["loss_mask"], L.aggregation)))
        ent_bt = scatter_tokens(ent.detach(), t["slots"], shape)
        entropy = float(ent_bt[t["loss_mask"].bool()].mean()) if t["loss_mask"].any() else 0.0
    stats.add(clip_frac=s["clip_frac"], ratio_max=s["ratio_max"], loss=float(loss.detach()), entropy=entropy)
    return finite


def mini_batch_step(
    u: Update, lb: LearnerBatch, micro: list[list[int]], mini: list[int], old: dict, ref: dict, stats: LearnStats
) -> None:
    """One optimizer step over the micro-batches ``mini``, aggregated exactly: each micro-batch's
    loss is weighted by its share of the mini-batch's tokens (token-mean) or sequences."""
    acc, o, agg = u.accelerator, u.cfg.optim, u.cfg.loss.aggregation
    denom_tok = sum(sum(sum(lb.mask[i]) for i in micro[m]) for m in mini)
    denom_seq = sum(len(micro[m]) for m in mini)
    u.optimizer.zero_grad(set_to_none=True)
    bad = 0.0
    for k, mi in enumerate(mini):
        t = collate(lb.select(micro[mi]), u.pad_id, acc.device)
        tokens = float(t["loss_mask"].sum())
        share = tokens / max(1, denom_tok) if agg == "token-mean" else len(micro[mi]) / max(1, denom_seq)
        last = k == len(mini) - 1
        ctx = acc.no_sync(u.policy) if not last and acc.num_processes > 1 else contextlib.nullcontext()
        with ctx:
            if not micro_batch_backward(u, t, old.get(mi), ref.get(mi), share, stats):
                bad = 1.0
    gn = acc.clip_grad_norm_(u.policy.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
    if acc.num_processes > 1:
        bad = float(acc.reduce(torch.tensor([bad], device=acc.device), reduction="sum"))
    if bad or not torch.isfinite(torch.as_tensor(gn)):  # the same verdict on every rank
        u.optimizer.zero_grad(set_to_none=True)
        stats.nonfinite += 1
        return
    stats.add(grad_norm=float(gn))
    u.optimizer.step()
    u.scheduler.step()


def learn(u: Update, lb: LearnerBatch) -> dict:
    """``epochs`` x ``mini_batches`` optimizer steps of PPO-clip over ``lb``; returns ``learn/*`` metrics."""
    o = u.cfg.optim
    lb, micro = plan_micro_batches(u, lb)
    if not micro:
        return {}
    old, ref = frozen_logprobs(u, lb, micro, need_old=o.epochs * o.mini_batches > 1)
    stats = LearnStats()
    rng = random.Random(len(lb))
    for _epoch in range(o.epochs):
        order = list(range(len(micro)))
        rng.shuffle(order)
        for mini in (order[i :: o.mini_batches] for i in range(o.mini_batches)):
            if mini:
                mini_batch_step(u, lb, micro, mini, old, ref, stats)
    out = {f"learn/{k}": statistics.mean(v) for k, v in stats.values.items() if v}
    out["learn/nonfinite_skipped"] = stats.nonfinite
    out["learn/micro_batches"] = len(micro)
    out["learn/lr"] = u.scheduler.get_last_lr()[0]
    return out
