"""The learner's side of a step: token log-probs of rollout sequences, micro-batches packed by
token count, and the tensors the policy loss needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.fused_logprob import fused_logprob
from kernels.fused_policy_loss import fused_policy_loss
from rl.trainer.core_algos import kl_k3, loss_mask, ppo_clip_token_loss, truncated_is_weights
from rollout.types import RolloutSequence


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight (tied or not; a PEFT-wrapped head's frozen base weight)."""
    head = _base_model(model).get_output_embeddings()
    head = getattr(head, "base_layer", head)
    return head.weight


@dataclass
class PolicyTokenLoss:
    """The learner's loss as a sum over tokens (flat order, [N] tensors, no grad), so that
    ``kernels.fused_policy_loss`` can take it chunk by chunk:

        L_i = W_i * (w_i * ppo_clip_i(logp_i, old_i, A_i) + kl_coef * k3(logp_i, ref_i))

    W: aggregation weights (``core_algos.aggregation_weights``); w: truncated IS weights,
    ``min(exp(old - sampler_logp), tis_cap)`` on sampled tokens; ``old_logp`` None means the
    current log-probs (first and only epoch).
    """

    weight: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    clip_low: float
    clip_high: float
    old_logp: torch.Tensor | None = None  # [N]
    sampler_logp: torch.Tensor | None = None  # [N]
    sampled: torch.Tensor | None = None  # [N] 1 where the sampler drew the token
    tis_cap: float | None = None
    ref_logp: torch.Tensor | None = None  # [N]
    kl_coef: float = 0.0

    def __call__(self, logp: torch.Tensor, entropy: torch.Tensor | None, rows: slice) -> torch.Tensor:  # [n]
        old = logp.detach() if self.old_logp is None else self.old_logp[rows]
        per_token = ppo_clip_token_loss(logp, old, self.advantages[rows], self.clip_low, self.clip_high)
        if self.tis_cap is not None:
            w, _ = truncated_is_weights(old, self.sampler_logp[rows], self.sampled[rows], self.tis_cap)
            per_token = per_token * w
        if self.kl_coef > 0:
            per_token = per_token + self.kl_coef * kl_k3(logp, self.ref_logp[rows])
        return self.weight[rows] * per_token


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns log-probs of chosen tokens and entropies, or
    with a ``token_loss`` the policy loss as well.

    The whole computation sits in ``forward`` so DDP / FSDP see every parameter used.
    With ``fused`` the last hidden states go with the LM head through ``kernels.fused_policy_loss``
    (or ``kernels.fused_logprob`` without a loss) and the ``[tokens, vocab]`` logits are never
    materialised; without it the model's full logits are used (the reference path).
    """

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused
        # accelerate's FSDP wraps the classes named here (the decoder layer of whatever architecture
        # the recipe loads: Qwen3DecoderLayer, Qwen2DecoderLayer, ...); it reads them off the module it
        # is given, which is this wrapper
        self._no_split_modules = list(getattr(_base_model(model), "_no_split_modules", None) or [])

    def _routed_hidden(self, input_ids, attention_mask, plans):
        """The final-normed hidden states [b, L, d] with row r run under its layer plan ``plans[r]``
        (joint training: the policy learns to answer under the plans its routers chose)."""
        from rollout.routing.routed_model import RoutedModel

        base = _base_model(self.model)
        out = RoutedModel(base, None, mode="grouped")(input_ids, attention_mask, plan=plans, lm_head=False)
        return base.get_decoder().norm(out.hidden)

    def forward(
        self,
        input_ids,
        attention_mask,
        positions,
        targets,
        temperature: float = 1.0,
        token_loss: PolicyTokenLoss | None = None,
        plans: torch.Tensor | None = None,
    ):
        """input_ids/attention_mask [b, L]; positions [N] flat indices into b*L of the tokens that
        predict targets [N]; ``plans`` [b, layers] (None: every layer once). Returns
        (logp [N], entropy [N]), or with ``token_loss`` (loss [], logp [N] detached, entropy [N]
        detached)."""
        routed = plans is not None and not bool((plans == 1).all())
        if self.fused:
            if routed:
                hidden = self._routed_hidden(input_ids, attention_mask, plans)
            else:
                decoder = _base_model(self.model).get_decoder()
                hidden = decoder(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state  # [b, L, d]
            h = hidden.reshape(-1, hidden.shape[-1])[positions]  # [N, d]
            if token_loss is not None:
                return fused_policy_loss(h, lm_head_weight(self.model), targets, token_loss, temperature=temperature)
            return fused_logprob(h, lm_head_weight(self.model), targets, temperature=temperature, return_entropy=True)
        if routed:
            logits = _base_model(self.model).lm_head(self._routed_hidden(input_ids, attention_mask, plans))
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [b, L, V]
        z = logits.reshape(-1, logits.shape[-1])[positions].float() / temperature  # [N, V]
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        if token_loss is not None:
            return token_loss(logp, ent, slice(0, logp.shape[0])).sum(), logp.detach(), ent.detach()
        return logp, ent


@dataclass
class LearnerBatch:
    """Sequences of one step as the learner sees them (lists, one entry per sequence)."""

    input_ids: list[list[int]]  # prompt + completion
    prompt_lens: list[int]
    mask: list[list[int]]  # per completion token: carries the loss
    sampled: list[list[int]]  # per completion token: drawn by the sampler
    sampler_logp: list[list[float]]
    advantages: list[float]
    plans: list[list[int] | None] | None = None  # per sequence its layer plan (None: every layer once)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: list[int]) -> LearnerBatch:
        fields = [f for f in self.__dataclass_fields__ if f != "plans"]
        plans = None if self.plans is None else [self.plans[i] for i in idx]
        return LearnerBatch(*[[getattr(self, f)[i] for i in idx] for f in fields], plans=plans)

    def __add__(self, other: LearnerBatch) -> LearnerBatch:
        """Both batches' sequences (the plans of a batch without them: None)."""
        fields = [f for f in self.__dataclass_fields__ if f != "plans"]
        plans = None
        if self.plans is not None or other.plans is not None:
            plans = (self.plans or [None] * len(self)) + (other.plans or [None] * len(other))
        return LearnerBatch(*[getattr(self, f) + getattr(other, f) for f in fields], plans=plans)


def build_learner_batch(
    seqs: list[RolloutSequence], advantages: list[float], masks: list[list[int]] | None = None
) -> LearnerBatch:
    """``masks`` (per sequence) replaces the loss masks ``core_algos.loss_mask`` would give."""
    return LearnerBatch(
        input_ids=[s.prompt_ids + s.completion_ids for s in seqs],
        prompt_lens=[len(s.prompt_ids) for s in seqs],
        mask=masks if masks is not None else [loss_mask(s.regions, s.is_full) for s in seqs],
        sampled=[s.sampled_mask for s in seqs],
        sampler_logp=[list(s.logprobs) for s in seqs],
        advantages=list(advantages),
    )


def pack_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so each micro-batch's padded size (rows x longest) stays within
    ``max_tokens``; sequences sorted by length so padding is small. A sequence longer than the
    budget gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, longest = [], [], 0
    for i in order:
        L = max(longest, lengths[i])
        if cur and L * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, L = [], lengths[i]
        cur.append(i)
        longest = L
    if cur:
        out.append(cur)
    return out


def collate(batch: LearnerBatch, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded tensors; completion tensors are [b, Tc] (Tc = longest completion)."""
    b = len(batch)
    L = max(len(x) for x in batch.input_ids)
    Tc = max(len(x) - p for x, p in zip(batch.input_ids, batch.prompt_lens))
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    attn = torch.zeros((b, L), dtype=torch.long)
    comp_mask = torch.zeros((b, Tc))
    loss_m = torch.zeros((b, Tc))
    sampled = torch.zeros((b, Tc))
    slogp = torch.zeros((b, Tc))
    positions, targets, slots = [], [], []
    for r, (x, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
        ids[r, : len(x)] = torch.tensor(x)
        attn[r, : len(x)] = 1
        n = len(x) - p
        comp_mask[r, :n] = 1
        loss_m[r, :n] = torch.tensor(batch.mask[r], dtype=torch.float)
        sampled[r, :n] = torch.tensor(batch.sampled[r], dtype=torch.float)
        slogp[r, :n] = torch.tensor(batch.sampler_logp[r], dtype=torch.float)
        positions.extend(r * L + p - 1 + t for t in range(n))  # token p+t is predicted at p+t-1
        targets.extend(x[p:])
        slots.extend(r * Tc + t for t in range(n))
    plans = None
    if batch.plans is not None and any(p is not None for p in batch.plans):
        width = len(next(p for p in batch.plans if p is not None))
        plans = torch.tensor([p if p is not None else [1] * width for p in batch.plans], dtype=torch.long)
        plans = plans.to(device)
    return {
        "plans": plans,
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "positions": torch.tensor(positions, dtype=torch.long, device=device),
        "targets": torch.tensor(targets, dtype=torch.long, device=device),
        "slots": torch.tensor(slots, dtype=torch.long, device=device),
        "completion_mask": comp_mask.to(device),
        "loss_mask": loss_m.to(device),
        "sampled": sampled.to(device),
        "sampler_logp": slogp.to(device),
        "advantages": torch.tensor(batch.advantages, dtype=torch.float, device=device),
    }


def scatter_tokens(flat: torch.Tensor, slots: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[N] per-token values -> [b, Tc] (zeros at padding), differentiable."""
    out = flat.new_zeros(shape[0] * shape[1])
    return out.index_put((slots,), flat).view(shape)
