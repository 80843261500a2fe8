"""The learner's side of a step: token log-probs of rollout sequences, micro-batches packed by
token count, and the tensors the policy loss needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.fused_logprob import fused_logprob
from rl.core_algos import loss_mask
from rollout.types import RolloutSequence


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight (tied or not; a PEFT-wrapped head's frozen base weight)."""
    head = _base_model(model).get_output_embeddings()
    head = getattr(head, "base_layer", head)
    return head.weight


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns log-probs of chosen tokens (and entropies).

    The whole computation sits in ``forward`` so DDP / FSDP / DeepSpeed see every parameter used.
    With ``fused`` the last hidden states go through ``kernels.fused_logprob`` with the LM head and
    the ``[tokens, vocab]`` logits are never materialised.
    """

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused

    def forward(self, input_ids, attention_mask, positions, targets, temperature: float = 1.0):
        # input_ids/attention_mask [b, L]; positions [N] flat indices into b*L of the tokens that
        # predict targets [N]
        if self.fused:
            decoder = _base_model(self.model).get_decoder()
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [b, L, d]
            h = hidden.reshape(-1, hidden.shape[-1])[positions]  # [N, d]
            return fused_logprob(h, lm_head_weight(self.model), targets, temperature=temperature, return_entropy=True)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [b, L, V]
        z = logits.reshape(-1, logits.shape[-1])[positions].float() / temperature  # [N, V]
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
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

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: list[int]) -> "LearnerBatch":
        return LearnerBatch(*[[getattr(self, f)[i] for i in idx] for f in self.__dataclass_fields__])


def build_learner_batch(seqs: list[RolloutSequence], advantages: list[float], mask_mode: str) -> LearnerBatch:
    return LearnerBatch(
        input_ids=[s.prompt_ids + s.completion_ids for s in seqs],
        prompt_lens=[len(s.prompt_ids) for s in seqs],
        mask=[loss_mask(s.regions, s.is_full, mask_mode) for s in seqs],
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
    return {
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
