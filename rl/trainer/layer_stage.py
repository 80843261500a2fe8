"""Joint training's layer stages of a step (``layers.enabled``): each serial group's full rollout
gets a layer serial group (``rl.trainer.layer_group``, the joint algorithm) whose variants are
verified and rewarded; the variants' answers join the policy's update under their plans as a loss
term of their own; after it the routers take one PPO-clip step in the policy's optimizer (their own
parameter group).

    layer_rollout: layer group -> verify -> rewards, advantages
    variant_learner_batch: the variants' answers, each with its plan, for the policy update
    router_step: router loss -> all-reduce -> clip -> step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.trainer.layer_group import (
    LayerGroup,
    LayerGroupConfig,
    dual_step,
    layer_advantages,
    layer_group_rewards,
    plan_agreement,
    router_update_loss,
    sample_layer_group,
    variant_correct,
)
from rl.trainer.learner import LearnerBatch
from rollout.routing.routed_generation import left_pad
from rollout.routing.routed_model import RoutedModel
from rollout.thinking import encode_in_context, scored_text, think_tag_ids, thinking_span
from rollout.types import SamplingConfig


def initial_layer_state(ly: LayerGroupConfig) -> dict:
    """The dual variables at step 0: ``multiplier`` (accuracy_constrained's mu) and ``entropy_coef``."""
    return {"multiplier": ly.multiplier_init, "entropy_coef": ly.entropy_coef}


def all_ranks_mean(acc, values: list[float]) -> list[float]:
    """Each value averaged over the ranks (the dual variables must stay identical on every rank)."""
    if acc.num_processes == 1:
        return values
    return (acc.reduce(torch.tensor(values, device=acc.device), reduction="mean")).tolist()


def eos_ids(model, tok) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return {i for i in [*ids, tok.eos_token_id] if i is not None}


@dataclass
class LayerRollout:
    """One step's layer serial groups, scored."""

    group: LayerGroup | None  # None when this rank had no full rollout
    advantages: torch.Tensor | None  # [B, K]
    stats: dict


def layer_rollout(t, ro, step: int) -> LayerRollout:
    """The layer serial groups of this step's full rollouts, verified and rewarded; ``layers/*``,
    ``reward/layer_mean`` and the variants' compute (``compute/variant_layer_tokens``: answer
    tokens x executed layers / L)."""
    cfg, tok, ly = t.cfg, t.tokenizer, t.cfg.layers
    seqs = ro.batch.sequences
    fulls = [seqs[i] for idx in ro.members for i in idx if seqs[i].is_full]
    if not fulls:
        return LayerRollout(None, None, {"compute/variant_layer_tokens": 0.0, "layers/answer_tokens": 0})
    pad = tok.pad_token_id or 0
    routed = RoutedModel(t.raw_model, t.routers, mode="grouped")
    L = routed.num_layers
    t.raw_model.eval()
    open_id, close_id = think_tag_ids(tok)
    exit_ids = encode_in_context(tok, cfg.rollout.serial.exit_prompt)
    thinking = [s.completion_ids[: thinking_span(s.completion_ids, open_id, close_id)[1]] for s in fulls]
    prompts = [s.prompt_ids for s in fulls]
    seed = cfg.run.seed * 100_003 + step * 101 + t.update.accelerator.process_index + 17
    generate_answers = None
    if cfg.rollout.backend != "hf":  # the rollout engine (routed vLLM, Ray actors) answers under the plans
        answer_sampling = SamplingConfig(
            max_tokens=ly.answer_max_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed + 1
        )

        def generate_answers(prefixes, plans):
            t.backend.wake_up()  # a GPU engine sleeps once the token rollouts are done
            gens = t.backend.generate_routed(prefixes, answer_sampling, plans, group_by_plan=False)
            t.backend.sleep()
            return [(g.completion_ids, g.logprobs) for g in gens]

    group = sample_layer_group(
        routed,
        prompts,
        thinking,
        exit_ids,
        ly,
        eos_ids=eos_ids(t.raw_model, tok),
        pad_id=pad,
        answer_temperature=cfg.rollout.temperature,
        seed=seed,
        generate_answers=generate_answers,
    )
    B, K, _ = group.plans.shape
    texts = [
        scored_text(tok, prompts[b], thinking[b] + exit_ids + group.answers[b][k]) for b in range(B) for k in range(K)
    ]
    golds = [ro.problems[s.group_id].answer for s in fulls for _ in range(K)]
    answered = torch.tensor(t.verifier.verify(texts, golds), dtype=torch.bool).view(B, K)
    agree = plan_agreement(routed, prompts, thinking, group.plans, pad)  # [B, K]
    correct = variant_correct(answered, agree, ly.thinking_agreement)
    executed = group.executed  # [B, K]
    state = t.layer_state
    rewards = layer_group_rewards(correct, executed, ly, L, state["multiplier"])
    adv = layer_advantages(rewards)
    gap = float(correct[:, -1].float().mean() - correct[:, :-1].float().mean())  # all-execute - sampled
    if ly.reward == "accuracy_constrained":  # dual ascent on gap <= max_accuracy_gap, the same on every rank
        (mean_gap,) = all_ranks_mean(t.update.accelerator, [gap])
        state["multiplier"] = dual_step(state["multiplier"], mean_gap - ly.max_accuracy_gap, ly.multiplier_lr)
    with torch.no_grad():
        greedy = routed.decide_plans(*left_pad(prompts, pad, routed.device))  # what serving would run
    answer_tokens = [len(a) for row in group.answers for a in row]
    stats = {
        "reward/layer_mean": float(rewards.mean()),
        "layers/sampled_executed_mean": float(executed[:, :-1].float().mean()),
        "layers/executed_mean": float(greedy.sum(-1).float().mean()),
        **{f"layers/skip_rate_l{i}": float((greedy[:, i] == 0).float().mean()) for i in range(L)},
        "layers/sampled_accuracy": float(correct[:, :-1].float().mean()),
        "layers/sampled_answer_accuracy": float(answered[:, :-1].float().mean()),
        "layers/sampled_thinking_agreement": float(agree[:, :-1].mean()),
        "layers/full_accuracy": float(correct[:, -1].float().mean()),
        "layers/accuracy_gap": gap,
        "layers/multiplier": state["multiplier"],
        "layers/zero_advantage_groups": int((adv.abs().sum(-1) < 1e-12).sum()),
        "layers/answer_tokens": sum(answer_tokens),
        "compute/variant_layer_tokens": sum(
            n * float(e) / L for n, e in zip(answer_tokens, executed.reshape(-1).tolist())
        ),
    }
    return LayerRollout(group, adv, stats)


def variant_learner_batch(lr: LayerRollout, serial_tokens: float, coef: float) -> LearnerBatch | None:
    """The layer variants' answers as learner sequences under their plans (the policy learns to
    answer with the layers its routers chose), for variants with a non-zero advantage, as a loss
    term of their own: their token weights (the batch's ``mask``) make the step's token-mean

        (sum_serial l + coef * N_s * mean_b mean_{t in b} l) / (N_s (1 + coef))

    = (serial token-mean + coef * the mean over prompts b of b's variant-token mean) / (1 + coef),
    N_s = ``serial_tokens`` (the serial groups' loss tokens); every prompt's variants weigh the same."""
    g = lr.group
    if g is None:
        return None
    rows = [
        (b, k)
        for b in range(g.plans.shape[0])
        for k in range(g.plans.shape[1])
        if abs(float(lr.advantages[b, k])) > 1e-12 and g.answers[b][k]
    ]
    if not rows:
        return None
    per_prompt = {b: sum(len(g.answers[bb][k]) for bb, k in rows if bb == b) for b, _ in rows}
    scale = coef * max(serial_tokens, 1.0) / len(per_prompt)  # each prompt's variant tokens sum to this
    return LearnerBatch(
        input_ids=[g.prefixes[b] + g.answers[b][k] for b, k in rows],
        prompt_lens=[len(g.prefixes[b]) for b, _ in rows],
        mask=[[scale / per_prompt[b]] * len(g.answers[b][k]) for b, k in rows],
        sampled=[[1] * len(g.answers[b][k]) for b, k in rows],
        sampler_logp=[list(g.answer_logprobs[b][k]) for b, k in rows],
        advantages=[float(lr.advantages[b, k]) for b, k in rows],
        plans=[g.plans[b, k].tolist() for b, k in rows],
    )


def router_step(t, lr: LayerRollout) -> dict:
    """One PPO-clip step of the routers in the policy's optimizer (their parameter group; the
    policy's group has no gradients at this point, so only the routers move). With several ranks
    their gradients are averaged here (they sit outside DDP's reducer), every rank steps."""
    cfg, ly = t.cfg, t.cfg.layers
    acc, opt = t.update.accelerator, t.update.optimizer
    stats: dict = {}
    opt.zero_grad(set_to_none=True)
    if lr.group is not None:
        routed = RoutedModel(t.raw_model, t.routers, mode="grouped")
        loss, stats = router_update_loss(
            routed, lr.group, lr.advantages, ly, t.tokenizer.pad_token_id or 0, t.layer_state["entropy_coef"]
        )
        loss.backward()
    if ly.min_entropy > 0:  # exploration: the entropy coefficient grows while the entropy is under its floor
        (entropy,) = all_ranks_mean(acc, [stats.get("layers/router_entropy", ly.min_entropy)])
        t.layer_state["entropy_coef"] = dual_step(
            t.layer_state["entropy_coef"], ly.min_entropy - entropy, ly.entropy_coef_lr
        )
    stats["layers/entropy_coef"] = t.layer_state["entropy_coef"]
    params = list(t.routers.parameters())
    if acc.num_processes > 1:
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = acc.reduce(g, reduction="mean")
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    if any(p.grad is not None for p in params):
        gn = torch.nn.utils.clip_grad_norm_(params, clip)
        if torch.isfinite(gn):
            opt.step()
            stats["layers/router_grad_norm"] = float(gn)
    opt.zero_grad(set_to_none=True)
    if acc.num_processes > 1:  # the ranks' routers must stay identical: their largest difference
        flat = torch.cat([p.detach().reshape(-1) for p in params])[None]
        every = acc.gather(flat)  # [world, n]
        stats["layers/router_rank_spread"] = float((every - every[:1]).abs().max())
    return stats
