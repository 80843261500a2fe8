"""Joint training's layer level, whole: beside each prompt's token serial group, K layer variants
of the same thinking, the rule that says which are correct, their rewards and the routers'
PPO-clip update (``rl.trainer.layer_stage`` runs it inside a training step).

    plans    K - 1 plans sampled from the routers (temperature tau) + the all-execute plan
    variant  prompt + thinking + exit prompt, re-read under its plan in one prefill, then the
             short answer generated under it; the verifier scores it
    correct  the answer alone says little: a plan that answers right after the full model's
             thinking may not think right itself (routers trained on answers alone learnt to skip
             what thinking needs: 0.225 held-out accuracy at 2.1 of 8 layers). A variant is
             correct when it answered right AND its plan keeps the all-execute model's argmax on
             at least ``thinking_agreement`` of the thinking positions (``plan_agreement``, one
             teacher-forced prefill; ``variant_correct`` applies the rule)
    reward   registered by name (``LAYER_REWARDS``): ``compute_decaying`` (the cheapest correct
             plan 1, the next compute level 0.5, ...; wrong plans 0) or ``accuracy_constrained``
             (the Lagrangian of "fewest layer passes subject to the sampled plans' accuracy at most
             ``max_accuracy_gap`` below the all-execute plan's": a correct variant earns
             ``mu + saved share``, a wrong one 0; ``mu`` rises by dual ascent while the gap is over
             its bound, so a layer cannot be bought with accuracy for long)
    explore  with ``min_entropy`` the entropy bonus's coefficient is a second multiplier: it grows
             while the routers' mean entropy is under the floor (``dual_step``), so they keep
             sampling plans off their mode instead of freezing into one mask
    advantage  A_k = r_k - mean_j r_j within the K variants
    update   PPO-clip on the per-layer action log-probs of the routers (teacher-forced routed prefill
             of the prompt under each plan; every router at once through ``kernels.batched_routers``)
             (``core_algos.ppo_clip_token_loss``, the policy's own surrogate) plus an entropy bonus

The routers decide from the prompt alone (as at serving time), so a plan's log-prob needs only the
prompt's prefill under that plan: router ``l`` reads the hidden states entering layer ``l``, which
depend on the actions of the layers before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kernels.batched_routers import batched_router_logits
from rl.trainer.core_algos import ppo_clip_token_loss
from rollout.routing.routed_generation import left_pad, routed_generate
from rollout.routing.routed_model import RoutedModel
from rollout.routing.router_features import plan_window_means
from rollout.routing.routers import EXECUTE


@dataclass
class LayerGroupConfig:
    """Joint training's layer level (``layers:`` in a recipe)."""

    enabled: bool = field(default=False, metadata={"help": "train layer routers jointly with the policy"})
    variants: int = field(default=4, metadata={"help": "K: layer variants per prompt, the all-execute plan included"})
    temperature: float = field(default=1.0, metadata={"help": "router sampling temperature of the K - 1 plans"})
    reward: Literal["compute_decaying", "accuracy_constrained"] = field(
        default="compute_decaying",
        metadata={
            "help": "compute_decaying: 1, 0.5, ... by compute among correct plans, wrong plans 0; "
            "accuracy_constrained: correct plans mu + their saved share of the layer passes, wrong 0, "
            "mu by dual ascent on max_accuracy_gap"
        },
    )
    max_accuracy_gap: float = field(
        default=0.02,
        metadata={
            "help": "accuracy_constrained: the bound on (all-execute accuracy - sampled plans' accuracy) "
            "the multiplier mu enforces"
        },
    )
    multiplier_init: float = field(default=1.0, metadata={"help": "accuracy_constrained: mu at step 0"})
    multiplier_lr: float = field(default=2.0, metadata={"help": "accuracy_constrained: dual ascent step of mu"})
    min_entropy: float = field(
        default=0.0,
        metadata={
            "help": "floor of the routers' mean action entropy (nats); > 0 makes entropy_coef the start of a "
            "multiplier that grows while the entropy is under it (0: a fixed entropy_coef)"
        },
    )
    entropy_coef_lr: float = field(default=0.05, metadata={"help": "min_entropy: dual ascent step of entropy_coef"})
    clip: float = field(default=0.2, metadata={"help": "PPO clip range of the router actions' ratio"})
    entropy_coef: float = field(default=0.01, metadata={"help": "router entropy bonus"})
    router_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the routers' parameter group"})
    policy_loss: bool = field(
        default=True,
        metadata={"help": "the variants' answers join the policy update under their plans (off: routers only)"},
    )
    policy_coef: float = field(
        default=0.1,
        metadata={
            "help": "policy_loss: the variants' answers are a loss term of their own, policy_coef x the mean over "
            "prompts of each prompt's token-mean, beside the serial groups' token-mean (so they cannot outweigh "
            "the length signal however many answer tokens they have)"
        },
    )
    answer_max_tokens: int = field(default=24, metadata={"help": "max answer tokens of a layer variant"})
    thinking_agreement: float = field(
        default=1.0,
        metadata={
            "help": "a variant counts as correct only when, teacher-forced on the full rollout's thinking under "
            "its plan, at least this share of the thinking positions keep the all-execute model's argmax "
            "(the plan could have thought it; label search's greedy check); 0: its answer alone decides"
        },
    )
    init_routers: str | None = field(
        default=None, metadata={"help": "warm start: a folder of routers.safetensors (`exitrl routers train`)"}
    )
    init_execute_bias: float = field(
        default=0.0,
        metadata={
            "help": "fresh routers: added to every router's execute logit, a prior towards the full model "
            "(2.0: the sampled plans start at p(execute) ~0.8 per layer and explore from there)"
        },
    )
    router_hidden: int = field(default=128, metadata={"help": "router MLP width (fresh routers)"})
    num_windows: int = field(default=8, metadata={"help": "prompt windows each router pools over (fresh routers)"})


# --- rewards and advantages: small pure functions, registered by name ---------------------------

LAYER_REWARDS: dict[str, Callable[..., list[float]]] = {}


def register_layer_reward(name: str):
    def deco(fn):
        LAYER_REWARDS[name] = fn
        return fn

    return deco


@register_layer_reward("compute_decaying")
def compute_decaying_rewards(correct: Sequence[bool], executed: Sequence[int], **_) -> list[float]:
    """A decaying reward ordered by compute: the correct variants' distinct compute levels sorted
    ascending, level k earns ``0.5 ** k`` (the cheapest correct plan 1, the next 0.5, ...); wrong
    variants 0. Variants of equal compute share a level."""
    levels = sorted({e for c, e in zip(correct, executed) if c})
    return [0.5 ** levels.index(e) if c else 0.0 for c, e in zip(correct, executed)]


@register_layer_reward("accuracy_constrained")
def accuracy_constrained_rewards(
    correct: Sequence[bool], executed: Sequence[int], *, num_layers: int, multiplier: float, **_
) -> list[float]:
    """The Lagrangian reward of "fewest layer passes subject to accuracy"::

        r_k = correct_k * (mu + (L - e_k) / L)

    e_k the variant's layer passes (a repeat counts twice), L the model's layers, mu >= 0 the price
    of a right answer (``dual_step``). A wrong variant saves nothing: it earns 0 whatever it skipped.
    A plan wrong on a share eps of the problems beats the all-execute plan in expectation only while
    (1 - eps)(mu + s) > mu, i.e. eps < s / (mu + s); mu grows until eps is within the bound."""
    return [multiplier + (num_layers - e) / num_layers if c else 0.0 for c, e in zip(correct, executed)]


def dual_step(multiplier: float, violation: float, lr: float) -> float:
    """Projected dual ascent: ``max(0, mu + lr * violation)``; violation > 0 while the constraint
    is broken (accuracy gap over its bound; entropy under its floor)."""
    return max(0.0, multiplier + lr * violation)


def get_layer_reward(name: str) -> Callable[..., list[float]]:
    try:
        return LAYER_REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown layer reward {name!r}; registered: {sorted(LAYER_REWARDS)}") from None


def layer_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, K] -> ``r - mean_k r`` [B, K]."""
    return rewards - rewards.mean(-1, keepdim=True)


def router_ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    clip: float = 0.2,
    entropy_coef: float = 0.0,
) -> torch.Tensor:
    """PPO-clip over the routers' actions, each (variant, layer) decision one token::

        loss = mean_{n,l} ppo_clip_token_loss(logp_nl, old_nl, A_n) - c_H mean_{n,l} H_nl

    logp, old_logp, entropy [N, L] (the taken actions; old without grad), advantages [N]."""
    a = advantages[:, None].to(logp.dtype)  # [N, 1]
    return ppo_clip_token_loss(logp, old_logp, a, clip, clip).mean() - entropy_coef * entropy.mean()  # [N, L] -> []


# --- the layer serial group -----------------------------------------------------------------------

# (prefixes [N], plans [N][L]) -> per variant (answer tokens, their sampler log-probs)
AnswerGenerator = Callable[[list[list[int]], list[list[int]]], list[tuple[list[int], list[float]]]]


@dataclass
class LayerGroup:
    """K variants of each of B prompts' thinking; tensors are [B, K, ...], variant K - 1 all-execute."""

    plans: torch.Tensor  # [B, K, L] long
    old_logp: torch.Tensor  # [B, K, L] the sampled actions' log-probs under softmax(z / tau)
    prompts: list[list[int]]  # [B] the prompts the routers read
    prefixes: list[list[int]]  # [B] prompt + thinking + exit prompt
    answers: list[list[list[int]]]  # [B][K] answer tokens
    answer_logprobs: list[list[list[float]]]  # [B][K] their sampler log-probs

    @property
    def executed(self) -> torch.Tensor:  # [B, K] layer passes (a repeat counts twice)
        return self.plans.sum(-1)


def router_logits_under_plans(
    routed: RoutedModel, prompts: list[list[int]], plans: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """Every router's logits [N, L, 3] for N prompts, each teacher-forced under its plan [N, L]. The
    model's part runs without grad (router inputs are features, ``router_training.plan_window_means``);
    the routers' part carries grad: the L MLPs in one batched pass (``kernels.batched_routers``)."""
    routers = routed.routers
    means, valid = plan_window_means(routed, prompts, plans, routers.config.num_windows, pad_id)
    return batched_router_logits(means, valid, routers.w1, routers.b1, routers.w2, routers.b2)


def action_logprobs(logits: torch.Tensor, actions: torch.Tensor, temperature: float):
    """(log-probs of the taken actions, entropies), both [N, L], of softmax(logits / tau)."""
    logp_all = torch.log_softmax(logits.float() / max(temperature, 1e-6), -1)  # [N, L, A]
    taken = logp_all.gather(-1, actions[..., None].to(logits.device)).squeeze(-1)
    return taken, -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def sample_layer_group(
    routed: RoutedModel,
    prompts: list[list[int]],
    thinking: list[list[int]],
    exit_ids: list[int],
    cfg: LayerGroupConfig,
    *,
    eos_ids: set[int],
    pad_id: int,
    answer_temperature: float,
    seed: int,
    generate_answers: AnswerGenerator | None = None,
) -> LayerGroup:
    """K - 1 router-sampled plans + all-execute per prompt, and each variant's answer after
    ``prompt + thinking + exit_ids`` under its plan: one batched routed generation on ``routed``,
    or ``generate_answers(prefixes, plans)`` (a rollout engine: ``VLLMBackend.generate_routed``,
    the Ray pool) -> (tokens, sampler log-probs) per variant."""
    B, K, L = len(prompts), cfg.variants, routed.num_layers
    if K < 2:
        raise ValueError(f"layers.variants must be >= 2 (sampled plans + all-execute), got {K}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids, attn = left_pad(prompts, pad_id, routed.device)
    # each deciding prefill returns the logits its plan was sampled from; the all-execute plan's
    # logits need one teacher-forced prefill of its own
    decided = [
        routed(ids, attn, temperature=cfg.temperature, generator=gen, logits_to_keep=1, lm_head=False)
        for _ in range(K - 1)
    ]
    full = torch.full((B, L), EXECUTE, dtype=torch.long)
    plans = torch.stack([d.plan.cpu() for d in decided] + [full], 1)  # [B, K, L]
    full_logits = router_logits_under_plans(routed, prompts, full, pad_id)  # [B, L, 3]
    logits = torch.stack([d.router_logits for d in decided] + [full_logits], 1)  # [B, K, L, 3]
    old_logp, _ = action_logprobs(logits.reshape(B * K, L, -1), plans.reshape(B * K, L), cfg.temperature)
    prefixes = [p + t + list(exit_ids) for p, t in zip(prompts, thinking)]
    flat_prefixes = [x for x in prefixes for _ in range(K)]
    if generate_answers is not None:
        rows = generate_answers(flat_prefixes, plans.reshape(B * K, L).tolist())
    else:
        rows = [
            (r.tokens, r.logprobs)
            for r in routed_generate(
                routed,
                flat_prefixes,
                max_tokens=cfg.answer_max_tokens,
                eos_ids=eos_ids,
                pad_id=pad_id,
                temperature=answer_temperature,
                seed=seed + 1,
                plans=plans.reshape(B * K, L),
            )
        ]
    return LayerGroup(
        plans=plans,
        old_logp=old_logp.reshape(B, K, L).cpu(),
        prompts=list(prompts),
        prefixes=prefixes,
        answers=[[list(rows[b * K + k][0]) for k in range(K)] for b in range(B)],
        answer_logprobs=[[list(rows[b * K + k][1]) for k in range(K)] for b in range(B)],
    )


@torch.no_grad()
def plan_agreement(
    routed: RoutedModel, prompts: list[list[int]], thinking: list[list[int]], plans: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """agree [B, K]: the share of prompt b's thinking positions where plan k's next-token argmax
    equals the all-execute plan's (the last variant), teacher-forced on prompt + thinking; 1 where
    there is no thinking. One forward per prompt (its K plans batched); hidden states go through the
    exit head at the thinking positions only (``kernels.exit_head``), never as [K, T, V] logits."""
    B, K, _ = plans.shape
    out = torch.ones(B, K)
    for b in range(B):
        n, m = len(prompts[b]), len(thinking[b])
        if m == 0:
            continue
        seq = list(prompts[b]) + list(thinking[b])
        ids, attn = left_pad([seq] * K, pad_id, routed.device)
        hidden = routed(ids, attn, plan=plans[b].to(routed.device), lm_head=False).hidden  # [K, T, d]
        at = torch.arange(n - 1, n + m - 1, device=ids.device)  # positions predicting the thinking
        arg = routed.readout(hidden[:, at], ids[:, at + 1]).argmax  # [K, m]
        out[b] = (arg == arg[-1:]).float().mean(-1).cpu()
    return out


def variant_correct(answered: torch.Tensor, agreement: torch.Tensor, threshold: float) -> torch.Tensor:
    """The rule (module docstring, ``correct``): answered [B, K] bool and agreement [B, K] ->
    correct [B, K] = answered and agreement >= threshold; threshold 0: the answer alone decides."""
    if threshold <= 0:
        return answered
    return answered & (agreement >= threshold - 1e-9)


def layer_group_rewards(
    correct: torch.Tensor, executed: torch.Tensor, cfg: LayerGroupConfig, num_layers: int, multiplier: float
) -> torch.Tensor:
    """correct [B, K] bool, executed [B, K] -> rewards [B, K] by ``cfg.reward``."""
    fn = get_layer_reward(cfg.reward)
    ctx = {"num_layers": num_layers, "multiplier": multiplier}
    return torch.tensor([fn(c.tolist(), e.tolist(), **ctx) for c, e in zip(correct, executed)], dtype=torch.float32)


def router_update_loss(
    routed: RoutedModel,
    group: LayerGroup,
    advantages: torch.Tensor,
    cfg: LayerGroupConfig,
    pad_id: int,
    entropy_coef: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The routers' loss for one layer group (grad into the routers only) and its metrics;
    ``entropy_coef`` (default ``cfg.entropy_coef``): the exploration multiplier's current value."""
    entropy_coef = cfg.entropy_coef if entropy_coef is None else entropy_coef
    B, K, L = group.plans.shape
    flat_prompts = [p for p in group.prompts for _ in range(K)]
    logits = router_logits_under_plans(routed, flat_prompts, group.plans.reshape(B * K, L), pad_id)
    logp, entropy = action_logprobs(logits, group.plans.reshape(B * K, L), cfg.temperature)
    old = group.old_logp.reshape(B * K, L).to(logp.device)
    loss = router_ppo_loss(logp, old, advantages.reshape(-1).to(logp.device), entropy, cfg.clip, entropy_coef)
    with torch.no_grad():
        rho = torch.exp(logp - old)
        stats = {
            "layers/router_entropy": float(entropy.mean()),
            "layers/router_clip_frac": float(((rho - 1).abs() > cfg.clip).float().mean()),
            "layers/router_loss": float(loss),
        }
    return loss, stats
