"""``exitrl bench logprob``: the trainer's fused policy loss vs the full-logits paths it replaces.

The work of one learner micro-batch at Qwen3-like shapes: a PPO-clip token loss, its gradients for
hidden and the LM head, and (unless ``entropy=False``) the per-token entropy every GRPO trainer logs
(without gradient, as TRL's ``entropy_from_logits``), through four ways of getting the log-probs:

    fused_loss     kernels.fused_policy_loss (the trainer's default): 3 matmuls, one [256, V] tile
    fused_logprob  kernels.fused_logprob + the loss in autograd: backward recomputes the tiles (4 matmuls)
    naive          full [N, V] logits, log_softmax, gather (what most trainers do)
    trl            full logits through TRL's selective_log_softmax
    liger          Liger-Kernel's LigerFusedLinearGRPOLoss (chunked fused linear + loss; the GPU
                   comparison, run when liger-kernel is installed: the `gpu` extra). It logs no
                   entropy, so with entropy on it does less work than the others

Each variant lives in its own worker process (so peak-memory readings do not mix) and the workers
are run round-robin, one timed pass each per round, so drift on a shared machine hits all alike.
Peak memory: on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
resident set once the inputs exist, minus the bytes of the gradients; on CUDA
``torch.cuda.max_memory_allocated`` beyond the same baseline.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from rl.bench.workers import Worker, measure, reset_peak, rss_kb

VARIANTS = ("fused_loss", "fused_logprob", "naive", "trl", "liger")
LIGER_SEQ = 256  # liger takes [B, T, d] with one advantage per sequence: N tokens as N / 256 sequences


def default_variants() -> tuple[str, ...]:
    import importlib.util

    have_liger = importlib.util.find_spec("liger_kernel") is not None
    return tuple(v for v in VARIANTS if v != "liger" or have_liger)


def _token_loss(adv: torch.Tensor, n: int):
    """PPO-clip per token at the first epoch (old = current), token-mean: the trainer's common case."""

    from rl.trainer.core_algos import ppo_clip_token_loss

    def loss(logp, _entropy, rows):  # [n]
        return ppo_clip_token_loss(logp, logp.detach(), adv[rows], 0.2, 0.28) / n

    return loss


def _loss(variant: str, h, w, y, token_loss, entropy: bool) -> torch.Tensor:
    """The scalar loss to backpropagate; the entropies (when asked) are computed and dropped."""
    rows = slice(0, h.shape[0])
    if variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        b = h.shape[0] // LIGER_SEQ
        loss_fn = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", compiled=h.is_cuda
        )
        adv = torch.linspace(-1.0, 1.0, b, device=h.device)  # one advantage per sequence
        mask = torch.ones(b, LIGER_SEQ, dtype=torch.long, device=h.device)
        hb = h[: b * LIGER_SEQ].view(b, LIGER_SEQ, -1)
        return loss_fn(hb, w, y[: b * LIGER_SEQ].view(b, LIGER_SEQ), mask, adv)[0]
    if variant == "fused_loss":
        from kernels.fused_policy_loss import fused_policy_loss

        return fused_policy_loss(h, w, y, token_loss)[0]  # entropies come with it
    if variant == "fused_logprob":
        from kernels.fused_logprob import fused_logprob

        logp, _ = fused_logprob(h, w, y, return_entropy=True)  # entropy comes with the forward
    else:
        logits = (h @ w.T).float()  # [N, V]
        if variant == "naive":
            logps = torch.log_softmax(logits, -1)
            logp = logps.gather(-1, y[:, None]).squeeze(-1)
            if entropy:
                with torch.no_grad():
                    _ = -(logps.exp() * logps).sum(-1)
        elif variant == "trl":
            from trl.trainer.utils import entropy_from_logits, selective_log_softmax

            logp = selective_log_softmax(logits, y)
            if entropy:
                with torch.no_grad():
                    _ = entropy_from_logits(logits)
        else:
            raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    return token_loss(logp, None, rows).sum()


def serve_variant(variant: str, n: int, v: int, d: int, dtype: str, device: str, entropy: bool = True) -> None:
    """Worker: build the inputs once, then one timed forward + backward per ``run`` line on stdin."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(n, d, device=device) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(v, d, device=device) * 0.02).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    token_loss = _token_loss(torch.randn(n, device=device), n)
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()  # the gradients count as inputs
    cuda = device.startswith("cuda")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        h.grad = w.grad = None  # as after optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_kb("VmRSS:") * 1024
            reset_peak()
        t0 = time.perf_counter()
        _loss(variant, h, w, y, token_loss, entropy).backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base - grad_bytes
        else:
            peak = rss_kb("VmHWM:") * 1024 - base - grad_bytes
        peak = max(0, peak)  # tiny shapes: the resident-set reading is noise around zero
        print(json.dumps({"time_s": time.perf_counter() - t0, "peak_bytes": peak}), flush=True)


def _worker(variant: str, n: int, v: int, d: int, dtype: str, device: str, entropy: bool, env=None) -> Worker:
    args = f"{variant!r}, {n}, {v}, {d}, {dtype!r}, {device!r}, {entropy}"
    return Worker(variant, f"from rl.bench.logprob import serve_variant; serve_variant({args})", env)


def main(
    n: int = 2048,
    v: int = 151936,
    d: int = 1024,
    dtype: str = "float32",
    device: str | None = None,
    repeats: int = 2,
    variants: tuple[str, ...] | None = None,
    entropy: bool = True,
    progress: bool = True,
) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = variants or default_variants()
    if "liger" in variants and n % LIGER_SEQ:
        raise ValueError(f"--n must be a multiple of {LIGER_SEQ} for the liger variant, got {n}")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown bench variants {sorted(unknown)}; known: {VARIANTS}")
    res = measure(
        lambda name, env: _worker(name, n, v, d, dtype, device, entropy, env),
        variants,
        repeats,
        "logprob",
        device,
        progress,
    )
    report: dict = {
        "shape": {"N": n, "V": v, "d": d, "dtype": dtype, "device": device},
        "repeats": repeats,
        "work": "PPO-clip loss, grads for hidden and LM head" + (", per-token entropy (no grad)" if entropy else ""),
    }
    report.update({f"{k}_{m}": res[k][m] for k in res for m in ("time_s", "peak_bytes")})

    def ratios(num: str, den: str, prefix: str) -> None:
        if num in res and den in res:
            den_bytes = res[den]["peak_bytes"]
            report[f"{prefix}mem_ratio"] = res[num]["peak_bytes"] / den_bytes if den_bytes > 0 else None
            report[f"{prefix}time_ratio"] = res[num]["time_s"] / res[den]["time_s"]

    ratios("fused_loss", "naive", "")  # the trainer's path against the usual one
    ratios("fused_loss", "trl", "vs_trl_")
    ratios("fused_logprob", "naive", "fused_logprob_")
    ratios("fused_loss", "liger", "vs_liger_")
    flops = 3 * 2 * n * v * d  # logits + the two gradient matmuls
    for k in res:
        report[f"{k}_tflops"] = flops / res[k]["time_s"] / 1e12
    return report
