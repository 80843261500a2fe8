"""The HF backend's sampling loop: what ``model.generate`` does for our rollouts, without its
per-step machinery, and with finished rows leaving the batch.

``model.generate`` spends more time per decode step around the model than in it on small models
(logits-processor lists, stopping-criteria lists, ``prepare_inputs_for_generation``, growing
``input_ids``, and every finished row still decoded until the last row ends). This loop keeps only
what our rollouts use:

    prefill (or the uncached suffix of a prefilled cache) -> repeat:
        float32 logits -> temperature (when != 1) -> top-p -> softmax -> multinomial (global RNG)
        -> append token + its log-prob -> EOS / First Finish closes rows -> finished rows leave
           the batch (the KV cache keeps the live rows only) -> one decoder step on the live rows

Sampling is ``generate``'s, draw for draw: the same processed distribution, and every row of the
original batch is drawn every step (a finished row from a dummy distribution), because
``torch.multinomial`` consumes the global generator per row. Position ids come from the attention
mask (left padding), as ``generate``'s ``prepare_inputs_for_generation`` computes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rollout.routing.routed_generation import process_logits


@functools.cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A full-attention cache layer writing into buffers with room to grow (``reserve``)."""

        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve
            self.buffers = None  # (keys, values) [B, H, capacity, hd]

        def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            """Take ``keys``/``values`` [B, H, capacity, hd] as the buffers, their first ``length``
            columns already filled (e.g. branch prefixes written straight into them)."""
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.buffers = (keys, values)
            self.keys, self.values = keys[..., :length, :], values[..., :length, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, s = self.get_seq_length(), key_states.shape[-2]
            if self.buffers is None or n + s > self.buffers[0].shape[-2]:
                cap = n + s + self.reserve
                new = tuple(x.new_empty((*x.shape[:2], cap, x.shape[-1])) for x in (key_states, value_states))
                if n:
                    new[0][..., :n, :] = self.keys
                    new[1][..., :n, :] = self.values
                self.buffers = new
            k, v = self.buffers
            k[..., n : n + s, :] = key_states
            v[..., n : n + s, :] = value_states
            self.keys, self.values = k[..., : n + s, :], v[..., : n + s, :]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if self.buffers is not None:
                n = self.get_seq_length()
                self.buffers = tuple(x[indices] for x in self.buffers)
                self.keys, self.values = self.buffers[0][..., :n, :], self.buffers[1][..., :n, :]

        def reset(self) -> None:
            self.buffers = None
            super().reset()

    return ReservedLayer


def reserved_cache(config, reserve: int):
    """A ``DynamicCache`` whose full-attention layers keep room for ``reserve`` more positions: a
    decode step writes its key and value in place and attention reads a view, where
    ``DynamicLayer`` concatenates (a copy of the whole layer cache per step, 1.7 s of the 4.4 s that
    512 serial-group branches took on the tiny model). Its layers' ``adopt(keys, values, length)``
    takes buffers filled by the caller (``left_padded_cache``)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    reserved = _reserved_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [reserved(reserve) if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


def left_padded_cache(config, prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]], reserve: int):
    """A reserved cache holding one row per prefix: ``prefixes[b]`` is per layer (keys, values)
    [H_kv, c_b, hd], written right-aligned at column ``P = max c_b`` straight into the layer's
    buffers [B, H_kv, P + reserve, hd] (no staging batch). The pad columns are zeroed: attention
    masks them, but a masked non-finite value would still reach the output as NaN."""
    cache = reserved_cache(config, reserve)
    P = max(kv[0][0].shape[1] for kv in prefixes)
    for layer, cached in enumerate(cache.layers):
        k0, v0 = prefixes[0][layer]
        bufs = tuple(
            x.new_empty((len(prefixes), x.shape[0], P + reserve, x.shape[-1])) for x in (k0, v0)
        )  # [B, H_kv, P + reserve, hd]
        for b, kv in enumerate(prefixes):
            k, v = kv[layer]
            c = k.shape[1]
            for buf, x in zip(bufs, (k, v)):
                buf[b, :, : P - c].zero_()
                buf[b, :, P - c : P] = x
        if hasattr(cached, "adopt"):
            cached.adopt(*bufs, P)
        else:  # a layer kind reserved_cache leaves as it is: hand it the prefix the usual way
            cache.update(bufs[0][..., :P, :], bufs[1][..., :P, :], layer)
    return cache


@dataclass
class DecodedRow:
    tokens: list[int]
    logprobs: list[float]  # of the processed distribution each token was drawn from
    finish: str  # stop | length | abort
    # with ``keep_kv``: per layer (keys, values) [H_kv, t, hd] of the row's real prompt tokens and
    # its generated tokens but the last (t = prompt + len(tokens) - 1), for branching from it
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def _positions(attn: torch.Tensor) -> torch.Tensor:
    pos = attn.long().cumsum(-1) - 1
    return pos.masked_fill(attn == 0, 1)


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_tokens: int,
    eos_ids: set[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache=None,
    stop_groups: list[int] | None = None,
    finishers: int = 1,
    compact_at: float = 0.25,
    logits_processor=None,
    keep_kv: bool = False,
) -> list[DecodedRow]:
    """Complete the B left-padded rows of ``input_ids`` [B, T] (``attention_mask`` [B, T]).

    ``cache``: a ``DynamicCache`` already holding the first ``cache.get_seq_length()`` columns
    (only the rest is prefilled). ``stop_groups`` [B]: First Finish Search; a group's rows stop
    once ``finishers`` of them emitted EOS (the others end with 'abort'). Finished rows leave the
    batch once they are at least ``compact_at`` of it (the cache is re-indexed then).
    ``logits_processor(step, rows, logits) -> logits`` edits the raw logits [b, V] of the batch
    rows ``rows`` [b] (their indices among the B) before temperature and top-p. ``keep_kv``: each
    row also returns its KV cache (``DecodedRow.kv``), copied out as it leaves the batch."""
    B, device, attn = input_ids.shape[0], input_ids.device, attention_mask
    cache = cache if cache is not None else reserved_cache(model.config, max_tokens)
    start = cache.get_seq_length()
    logits = last_logits(model, input_ids[:, start:], attn, _positions(attn)[:, start:], cache)  # [B, V]
    eos = torch.tensor(sorted(eos_ids), device=device)
    groups = torch.tensor(stop_groups if stop_groups is not None else list(range(B)), device=device)
    live = torch.arange(B, device=device)  # original row of each batch row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per original row
    ended = torch.zeros(B, dtype=torch.bool, device=device)  # emitted EOS
    finish = ["length"] * B
    drawn: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step (rows, tokens, log-probs)
    T0 = input_ids.shape[1]
    pad = (T0 - attention_mask.sum(-1)).tolist()  # [B] left-padding columns
    kv: list = [None] * B

    def take_kv(batch_rows: torch.Tensor) -> None:  # copy the rows' real columns out of the cache
        for b in batch_rows.tolist():
            r = int(live[b])
            end = T0 + len_of[r] - 1
            kv[r] = [(x.keys[b, :, pad[r] : end].clone(), x.values[b, :, pad[r] : end].clone()) for x in cache.layers]

    len_of = [0] * B
    for step in range(max_tokens):
        logits = logits.float()
        if logits_processor is not None:
            logits = logits_processor(step, live, logits)
        nxt, logp = draw(logits, live, B, temperature, top_p)  # [b], [b]
        active = ~done[live]  # [b] batch rows still decoding at this step
        drawn.append((live[active], nxt[active], logp[active]))
        if keep_kv:
            for r in live[active].tolist():
                len_of[r] += 1
        finished = active & torch.isin(nxt, eos)
        if bool(finished.any()):
            mark_finished(live[finished], finish, done, ended, groups if stop_groups is not None else None, finishers)
        if bool(done.all()) or step == max_tokens - 1:
            break
        keep = ~done[live]
        if float((~keep).float().mean()) >= compact_at:
            idx = keep.nonzero().squeeze(-1)
            if keep_kv:
                take_kv((~keep).nonzero().squeeze(-1))
            cache.batch_select_indices(idx)
            live, attn, nxt = live[idx], attn[idx], nxt[idx]
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], 1)
        logits = last_logits(model, nxt[:, None], attn, _positions(attn)[:, -1:], cache)
    if keep_kv:
        take_kv(torch.arange(len(live)))
    toks: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    for rows, t, lp in drawn:
        for r, tok, x in zip(rows.tolist(), t.tolist(), lp.tolist()):
            toks[r].append(tok)
            lps[r].append(x)
    return [DecodedRow(toks[r], lps[r], finish[r], kv[r]) for r in range(B)]


def last_logits(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """One forward of the new columns ``input_ids`` onto ``cache``: the last position's logits [b, V]."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def draw(logits: torch.Tensor, live: torch.Tensor, B: int, temperature: float, top_p: float):
    """The next token [b] of each live row from its raw logits [b, V] and its log-prob [b] under the
    processed distribution. Sampling draws for all B original rows (finished ones from a uniform
    row), so the RNG stream is ``model.generate``'s whatever rows have left the batch."""
    z = process_logits(logits, temperature, top_p)  # [b, V]
    if temperature <= 0:
        nxt = z.argmax(-1)
    else:
        V = z.shape[-1]
        probs = torch.full((B, V), 1.0 / V, device=z.device)
        probs[live] = z.softmax(-1)
        nxt = torch.multinomial(probs, 1).squeeze(-1)[live]
    return nxt, torch.log_softmax(z, -1).gather(1, nxt[:, None]).squeeze(-1)


def mark_finished(rows, finish: list[str], done, ended, groups, finishers: int) -> None:
    """Original rows ``rows`` emitted EOS: they stop; with FFS ``groups`` [B], every other row of a
    group with ``finishers`` ended rows stops too, as 'abort'."""
    for r in rows.tolist():
        finish[r] = "stop"
    done[rows] = True
    ended[rows] = True
    if groups is not None:
        count = torch.bincount(groups, weights=ended.double(), minlength=int(groups.max()) + 1)
        closed = (count[groups] >= finishers) & ~done
        for r in closed.nonzero().squeeze(-1).tolist():
            finish[r] = "abort"
        done |= closed
