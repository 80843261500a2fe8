"""Joint training's layer stage of a step (``layers.enabled``): after the token-level update, each
serial group's full rollout gets a layer serial group (``rl.routing.layer_group``), its variants are
verified, and the routers take one PPO-clip step in the policy's optimizer (their own parameter
group).

    layer group -> verify -> rewards, advantages -> router loss -> all-reduce -> clip -> step
"""

from __future__ import annotations

import torch

from rl.routing.layer_group import layer_advantages, layer_group_rewards, router_update_loss, sample_layer_group
from rollout.routing.routed_generation import left_pad
from rollout.routing.routed_model import RoutedModel
from rollout.serial_group import encode_in_context
from rollout.thinking import scored_text, think_tag_ids, thinking_span


def eos_ids(model, tok) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return {i for i in [*ids, tok.eos_token_id] if i is not None}


def layer_stage(t, ro, step: int) -> dict:
    """The layer serial groups of this step's full rollouts and the routers' update; ``layers/*``,
    ``reward/layer_mean`` and the variants' compute (``compute/variant_layer_tokens``: answer tokens
    x executed layers / L)."""
    cfg, tok, ly = t.cfg, t.tokenizer, t.cfg.layers
    acc, opt = t.update.accelerator, t.update.optimizer
    seqs = ro.batch.sequences
    fulls = [seqs[i] for idx in ro.members for i in idx if seqs[i].is_full]
    pad = tok.pad_token_id or 0
    routed = RoutedModel(t.raw_model, t.routers, mode="grouped")
    L = routed.num_layers
    t.raw_model.eval()
    stats: dict = {}
    opt.zero_grad(set_to_none=True)
    if fulls:
        open_id, close_id = think_tag_ids(tok)
        exit_ids = encode_in_context(tok, cfg.rollout.serial.exit_prompt)
        thinking = [s.completion_ids[: thinking_span(s.completion_ids, open_id, close_id)[1]] for s in fulls]
        prompts = [s.prompt_ids for s in fulls]
        seed = cfg.run.seed * 100_003 + step * 101 + acc.process_index + 17
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
        )
        B, K, _ = group.plans.shape
        texts = [
            scored_text(tok, prompts[b], thinking[b] + exit_ids + group.answers[b][k])
            for b in range(B)
            for k in range(K)
        ]
        golds = [ro.problems[s.group_id].answer for s in fulls for _ in range(K)]
        correct = torch.tensor(t.verifier.verify(texts, golds), dtype=torch.bool).view(B, K)
        executed = group.executed  # [B, K]
        rewards = layer_group_rewards(correct, executed, L, ly)
        adv = layer_advantages(rewards)
        loss, stats = router_update_loss(routed, group, adv, ly, pad)
        loss.backward()
        with torch.no_grad():
            greedy = routed.decide_plans(*left_pad(prompts, pad, routed.device))  # what serving would run
        answer_tokens = [len(a) for row in group.answers for a in row]
        stats.update(
            {
                "reward/layer_mean": float(rewards.mean()),
                "layers/sampled_executed_mean": float(executed[:, :-1].float().mean()),
                "layers/executed_mean": float(greedy.sum(-1).float().mean()),
                **{f"layers/skip_rate_l{i}": float((greedy[:, i] == 0).float().mean()) for i in range(L)},
                "layers/sampled_accuracy": float(correct[:, :-1].float().mean()),
                "layers/full_accuracy": float(correct[:, -1].float().mean()),
                "layers/zero_advantage_groups": int((adv.abs().sum(-1) < 1e-12).sum()),
                "layers/answer_tokens": sum(answer_tokens),
                "compute/variant_layer_tokens": sum(
                    n * float(e) / L for n, e in zip(answer_tokens, executed.reshape(-1).tolist())
                ),
            }
        )
    params = list(t.routers.parameters())
    if acc.num_processes > 1:  # the routers sit outside DDP's reducer: average their gradients here
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = acc.reduce(g, reduction="mean")
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    if any(p.grad is not None for p in params):
        gn = torch.nn.utils.clip_grad_norm_(params, clip)
        if torch.isfinite(gn):
            opt.step()  # the policy's group has no gradients now: only the routers move
            stats["layers/router_grad_norm"] = float(gn)
    opt.zero_grad(set_to_none=True)
    if acc.num_processes > 1:  # the ranks' routers must stay identical: their largest difference
        flat = torch.cat([p.detach().reshape(-1) for p in params])[None]
        every = acc.gather(flat)  # [world, n]
        stats["layers/router_rank_spread"] = float((every - every[:1]).abs().max())
    return stats if fulls else {**stats, "compute/variant_layer_tokens": 0.0, "layers/answer_tokens": 0}
