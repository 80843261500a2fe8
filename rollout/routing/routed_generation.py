"""Batched decoding under per-row layer plans (the routed counterpart of ``model.generate``).

One routed prefill decides each row's plan (or takes the given one) and fills the routed cache;
every decode step then runs the same plan. Sampling matches the HF backend's: greedy, or
temperature then top-p, and the returned log-probs are those of the processed distribution the
token was drawn from. ``stop_groups`` gives First Finish Search: a group's rows stop once ``finishers``
of them (default one) emitted EOS (the others finish with 'abort').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.routing.routed_model import RoutedModel


@dataclass
class RoutedRow:
    tokens: list[int]
    logprobs: list[float]
    finish: str  # stop | length | abort
    plan: list[int]


def process_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature then top-p (nucleus) filtering, as HF's warpers: logits [B, V] -> [B, V]."""
    if temperature <= 0:
        return logits
    z = logits / temperature
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, descending=False, dim=-1)
        cum = sorted_z.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False  # keep at least the top token
        z = z.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return z


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        if s:
            ids[r, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[r, T - len(s) :] = 1
    return ids.to(device), attn.to(device)


def route_mask_for(attn: torch.Tensor, route_lens: list[int] | None) -> torch.Tensor | None:
    """Mask of the first ``route_lens[r]`` real tokens of each (left-padded) row: what the routers read."""
    if route_lens is None:
        return None
    rank = attn.long().cumsum(-1) - 1
    limit = torch.tensor(route_lens, device=attn.device)[:, None]
    return attn.bool() & (rank < limit)


@torch.no_grad()
def routed_generate(
    routed: RoutedModel,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    plans: torch.Tensor | None = None,
    route_lens: list[int] | None = None,
    skip_bias: float = 0.0,
    stop_groups: list[int] | None = None,
    finishers: int = 1,
) -> list[RoutedRow]:
    """Complete every prompt under its plan. ``plans`` [B, L] fixes them; otherwise the routers
    decide from the first ``route_lens[r]`` tokens of row r (default: the whole prompt)."""
    device = routed.device
    ids, attn = left_pad(prompts, pad_id, device)
    B = ids.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = routed.forward(
        ids,
        attn,
        plan=plans,
        use_cache=True,
        route_mask=route_mask_for(attn, route_lens),
        skip_bias=skip_bias,
        logits_to_keep=1,
    )
    cache, plan = out.cache, out.plan
    logits = out.logits[:, -1]
    eos = torch.tensor(sorted(eos_ids), device=device)
    groups = torch.tensor(stop_groups if stop_groups is not None else list(range(B)), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)  # rows that emitted EOS
    finish = ["length"] * B
    toks: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    for step in range(max_tokens):
        z = process_logits(logits.float(), temperature, top_p)
        logp = torch.log_softmax(z, -1)
        if temperature <= 0:
            nxt = z.argmax(-1)
        else:
            nxt = torch.multinomial(logp.exp().cpu(), 1, generator=gen).squeeze(-1).to(device)
        chosen = logp.gather(1, nxt[:, None]).squeeze(-1)
        for r in (~done).nonzero().squeeze(-1).tolist():
            toks[r].append(int(nxt[r]))
            lps[r].append(float(chosen[r]))
        finished = ~done & torch.isin(nxt, eos)
        for r in finished.nonzero().squeeze(-1).tolist():
            finish[r] = "stop"
        done |= finished
        ended |= finished
        if stop_groups is not None and bool(finished.any()):
            count = torch.bincount(groups, weights=ended.double(), minlength=int(groups.max()) + 1)
            closed = count[groups] >= finishers
            for r in (closed & ~done).nonzero().squeeze(-1).tolist():
                finish[r] = "abort"
            done |= closed
        if bool(done.all()) or step == max_tokens - 1:
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
        logits = routed.forward(nxt[:, None], attn, cache=cache).logits[:, -1]
    plan_rows = plan.tolist()
    return [RoutedRow(toks[r], lps[r], finish[r], plan_rows[r]) for r in range(B)]
