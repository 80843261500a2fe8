"""Dr.LLM layer routers: one small MLP per decoder layer choosing skip / execute / repeat.

Router ``l`` reads the hidden states entering layer ``l``, mean-pooled over up to ``num_windows``
contiguous windows of the prompt's real tokens (padding masked out), and averages the windows'
logits::

    logits_l = mean_w  W2_l · gelu(W1_l · mean_{t in window w} h_t + b1_l) + b2_l      # [B, 3]

Actions: 0 skip (the hidden state passes through), 1 execute, 2 execute twice (shared weights, own
KV-cache slot). The L routers' weights are stacked (``w1 [L, d, r]``, ``w2 [L, r, 3]``) so all
layers can also be evaluated as one batched operation when every layer's inputs are at hand.
Saved beside a model as ``routers.safetensors`` + ``routers.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels.batched_routers import all_layer_window_means, batched_router_logits

SKIP, EXECUTE, REPEAT = 0, 1, 2
NUM_ACTIONS = 3
ROUTERS_FILE = "routers.safetensors"
ROUTERS_CONFIG = "routers.json"


@dataclass
class RouterConfig:
    num_layers: int
    hidden_size: int
    router_hidden: int = 128
    num_windows: int = 8

    @property
    def input_size(self) -> int:
        return self.hidden_size

    @classmethod
    def from_json(cls, text: str, source: str) -> RouterConfig:
        """A saved ``routers.json``; routers saved with the read-out features (an option since
        removed: docs/results/ablations.md) are refused by name, its ``false`` default is accepted."""
        fields = json.loads(text)
        if fields.pop("readout_features", False):
            raise ValueError(f"{source}: routers trained with readout_features, which exitrl no longer runs")
        return cls(**fields)


def window_means(h: torch.Tensor, mask: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``h`` over up to ``num_windows`` contiguous windows of each row's real tokens.

    h: [B, T, d]; mask: [B, T] (1 = real token, anywhere: left or right padding).
    Returns means [B, W, d] and valid [B, W] (a row with n < W real tokens has n windows).
    Token with rank k (0-based among the row's n real tokens) falls in window floor(k * w / n),
    w = min(W, n), so windows differ in size by at most one token (``kernels.batched_routers``).
    """
    means, valid = all_layer_window_means(h[None], mask, num_windows)  # [B, 1, W, d]
    return means[:, 0].to(h.dtype), valid


class LayerRouters(nn.Module):
    """The L per-layer routers, weights stacked over layers."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        L, d, r = config.num_layers, config.input_size, config.router_hidden
        self.w1 = nn.Parameter(torch.empty(L, d, r))
        self.b1 = nn.Parameter(torch.empty(L, r))
        self.w2 = nn.Parameter(torch.empty(L, r, NUM_ACTIONS))
        self.b2 = nn.Parameter(torch.empty(L, NUM_ACTIONS))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init per layer (uniform in +-1/sqrt(fan_in))."""
        d, r = self.config.input_size, self.config.router_hidden
        with torch.no_grad():
            for p, fan_in in ((self.w1, d), (self.b1, d), (self.w2, r), (self.b2, r)):
                p.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def window_logits(self, layer: int, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Router ``layer`` on window means [B, W, d] -> logits [B, 3] (valid windows averaged)."""
        z = F.gelu(means.to(self.w1.dtype) @ self.w1[layer] + self.b1[layer])  # [B, W, r]
        logits = z @ self.w2[layer] + self.b2[layer]  # [B, W, 3]
        v = valid.to(logits.dtype).unsqueeze(-1)  # [B, W, 1]
        return (logits * v).sum(1) / v.sum(1).clamp(min=1)  # [B, 3]

    def layer_logits(self, layer: int, h: torch.Tensor, route_mask: torch.Tensor) -> torch.Tensor:
        """Router ``layer`` on the hidden states entering it: h [B, T, d], route_mask [B, T]."""
        means, valid = window_means(h, route_mask, self.config.num_windows)
        return self.window_logits(layer, means, valid)

    def all_window_logits(self, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every router at once: means [N, L, W, d] (layer l's inputs), valid [N, W] -> [N, L, 3]."""
        return batched_router_logits(means, valid, self.w1, self.b1, self.w2, self.b2)

    def all_layer_logits(self, layer_inputs, mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Every router on every layer's inputs ([L, B, T, d] or L tensors [B, T, d]), mask [B, T]
        -> [B, L, 3], batched (``kernels.batched_routers``)."""
        means, valid = all_layer_window_means(layer_inputs, mask, self.config.num_windows, backend)
        return self.all_window_logits(means, valid)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / ROUTERS_FILE))
        (out / ROUTERS_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> LayerRouters:
        from safetensors.torch import load_file

        d = Path(directory)
        for f in (ROUTERS_FILE, ROUTERS_CONFIG):
            if not (d / f).exists():
                raise FileNotFoundError(f"{d}: no {f} (routers are saved by `exitrl routers train`)")
        config = RouterConfig.from_json((d / ROUTERS_CONFIG).read_text(), str(d / ROUTERS_CONFIG))
        routers = cls(config)
        routers.load_state_dict(load_file(str(d / ROUTERS_FILE)))
        return routers.to(device).eval()


def check_plans(prompt_ids: list, plans: list, num_layers: int) -> list[tuple[int, ...]]:
    """Given layer plans, one per prompt, as tuples of ints; a ``ValueError`` names the first plan
    of the wrong length or with an action outside skip / execute / repeat."""
    if len(plans) != len(prompt_ids):
        raise ValueError(f"generate_routed: {len(plans)} plans for {len(prompt_ids)} prompts")
    out = []
    for i, plan in enumerate(plans):
        if len(plan) != num_layers or any(int(a) not in (SKIP, EXECUTE, REPEAT) for a in plan):
            raise ValueError(
                f"prompt {i}: plan of {len(plan)} layers {list(plan)}; the model has {num_layers} (0/1/2 each)"
            )
        out.append(tuple(int(a) for a in plan))
    return out


def choose_actions(
    logits: torch.Tensor, skip_bias: float = 0.0, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Actions [B] from router logits [B, 3]: argmax (temperature 0) or a sample, after adding
    ``skip_bias`` to the skip logit (positive = skip more)."""
    z = logits.float().clone()
    z[:, SKIP] += skip_bias
    if temperature <= 0:
        return z.argmax(-1)
    probs = torch.softmax(z / temperature, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
