"""Hugging Face transformers ``generate`` backend (CPU and GPU; the reference backend)."""

from __future__ import annotations

import torch

from rollout.types import Generation, SamplingConfig


class HFBackend:
    """Generation with ``model.generate``; returns per-token sampler log-probs and finish reasons."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **kw) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cls(model, tok, **kw)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """``sampling.n`` completions for each prompt (prompt-major order)."""
        out: list[Generation] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        flat = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        device = next(self.model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            T = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, (_, p) in enumerate(chunk):  # left padding
                ids[r, T - len(p) :] = torch.tensor(p)
                attn[r, T - len(p) :] = 1
            greedy = sampling.temperature == 0
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            res = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=sampling.max_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids),
                output_scores=True,
                return_dict_in_generate=True,
            )
            seqs = res.sequences[:, T:].cpu()
            # scores are the processed (temperature / top-p) logits the sampler drew from
            logps = torch.stack([torch.log_softmax(s.float(), -1) for s in res.scores], 1).cpu() if res.scores else None
            for r, (pi, p) in enumerate(chunk):
                toks, lps, finish = [], [], "length"
                for t, tok in enumerate(seqs[r].tolist()):
                    toks.append(tok)
                    lps.append(float(logps[r, t, tok]) if logps is not None else 0.0)
                    if tok in self.eos_ids:
                        finish = "stop"
                        break
                out.append(Generation(list(p), toks, lps, finish, prompt_index=pi))
        return out
