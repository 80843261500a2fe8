"""``exitrl bench exit-head``: the exit-head kernels against what they replace, on the same inputs in
one run, at the tiny reasoner's shape and a larger one.

Read-outs (S layers' hidden states through the final norm and the LM head, targets given; forward,
as the label search and the depth report use them):

    fused   kernels.exit_head.layer_readout: token chunks x vocab tiles, statistics only
    naive   per layer: full [N, V] logits, log_softmax, max, entropy, gather

Routers (the focal loss of all L routers from every layer's inputs, forward + backward into the
router weights, as the router training and the joint update run it):

    batched kernels.batched_routers.fused_router_focal_loss: one window matmul, two batched MLP
            contractions
    loop    a Python loop over layers and windows (a masked mean per window, one router at a time)

Each variant runs in its own worker process (peak-memory readings do not mix); workers run
round-robin, one timed pass each per round. Peak memory: on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs) beyond the resident set once the inputs exist, read in separate
workers whose allocator returns freed memory (``rl.bench.workers.measure``); on CUDA
``torch.cuda.max_memory_allocated`` beyond the same baseline.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from rl.bench.workers import Worker, measure, reset_peak, rss_kb

SHAPES = {
    # the tiny reasoner: 8 layers, d 128, its 384-token vocabulary; 16 prompts of 128 tokens
    "tiny": {"S": 8, "N": 2048, "d": 128, "V": 384, "B": 16, "T": 128},
    # a 1B-class model: d 1024, a 32k vocabulary; 8 prompts of 256 tokens
    "large": {"S": 8, "N": 2048, "d": 1024, "V": 32768, "B": 8, "T": 256},
}
VARIANTS = ("readout_fused", "readout_naive", "routers_batched", "routers_loop")
NUM_WINDOWS, ROUTER_HIDDEN = 8, 128


def loop_router_focal_loss(h, mask, w1, b1, w2, b2, labels, class_weights, gamma, num_windows):
    """The baseline: one router at a time, one window at a time (what Dr.LLM's code does per layer)."""
    import torch.nn.functional as F

    from kernels.batched_routers import window_index

    win, counts = window_index(mask, num_windows)
    total = 0.0
    for layer in range(h.shape[0]):
        per_window = []
        for w in range(num_windows):
            sel = (win == w).to(h.dtype)  # [B, T]
            mean = (h[layer] * sel[..., None]).sum(1) / counts[:, w].clamp(min=1)[:, None]  # [B, d]
            per_window.append(F.gelu(mean @ w1[layer] + b1[layer]) @ w2[layer] + b2[layer])  # [B, 3]
        valid = (counts > 0).to(h.dtype)  # [B, W]
        logits = (torch.stack(per_window, 1) * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        logp = torch.log_softmax(logits, -1).gather(1, labels[:, layer : layer + 1]).squeeze(1)
        total = total + (class_weights[labels[:, layer]] * (1 - logp.exp()) ** gamma * -logp).sum()
    return total / labels.numel()


def _make(variant: str, shape: dict, device: str):
    """Inputs and the timed callable of one variant."""
    g = torch.Generator(device="cpu").manual_seed(0)
    S, N, d, V, B, T = (shape[k] for k in ("S", "N", "d", "V", "B", "T"))
    if variant.startswith("readout"):
        from kernels.exit_head import layer_readout, naive_layer_readout

        h = torch.randn(S, N, d, generator=g).to(device)
        w = (torch.randn(V, d, generator=g) * 0.05).to(device)
        gn = torch.ones(d, device=device)
        y = torch.randint(0, V, (N,), generator=g).to(device)
        fn = layer_readout if variant == "readout_fused" else naive_layer_readout

        def run():
            with torch.no_grad():
                out = fn(h, w, gn, y)
            return float(out.lse.sum())

        return run
    from kernels.batched_routers import fused_router_focal_loss

    L = S
    h = torch.randn(L, B, T, d, generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):  # left padding of varied length, as a batch of prompts has
        mask[b, : (b * 7) % (T // 2)] = 0
    mask = mask.to(device)
    params = [
        (torch.randn(*s, generator=g) * 0.05).to(device).requires_grad_()
        for s in ((L, d, ROUTER_HIDDEN), (L, ROUTER_HIDDEN), (L, ROUTER_HIDDEN, 3), (L, 3))
    ]
    labels = torch.randint(0, 3, (B, L), generator=g).to(device)
    cw = torch.tensor([2.0, 0.5, 1.0], device=device)

    def run():
        for p in params:
            p.grad = None
        if variant == "routers_batched":
            loss = fused_router_focal_loss(h, mask, *params, labels, cw, 2.0, NUM_WINDOWS)[0]
        else:
            loss = loop_router_focal_loss(h, mask, *params, labels, cw, 2.0, NUM_WINDOWS)
        loss.backward()
        return float(loss)

    return run


def serve_variant(variant: str, shape_json: str, device: str) -> None:
    """Worker: build the inputs once, then one timed pass per ``run`` line on stdin."""
    torch.manual_seed(0)
    run = _make(variant, json.loads(shape_json), device)
    cuda = device.startswith("cuda")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_kb("VmRSS:") * 1024
            reset_peak()
        t0 = time.perf_counter()
        value = run()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = rss_kb("VmHWM:") * 1024 - base
        print(json.dumps({"time_s": time.perf_counter() - t0, "peak_bytes": max(0, peak), "value": value}), flush=True)


def _worker(variant: str, shape: dict, device: str, env: dict | None = None) -> Worker:
    args = f"{variant!r}, {json.dumps(shape)!r}, {device!r}"
    return Worker(variant, f"from rl.bench.exit_head import serve_variant; serve_variant({args})", env)


def bench_shape(shape: dict, device: str, repeats: int, progress: bool, label: str) -> dict:
    res = measure(
        lambda v, env: _worker(v, shape, device, env), VARIANTS, repeats, f"exit-head {label}", device, progress
    )
    out: dict = {"shape": shape}
    for k, r in res.items():
        out[f"{k}_time_s"] = round(r["time_s"], 5)
        out[f"{k}_peak_bytes"] = r["peak_bytes"]
    naive_peak = res["readout_naive"]["peak_bytes"]
    out["mem_ratio"] = res["readout_fused"]["peak_bytes"] / naive_peak if naive_peak > 0 else None
    out["time_ratio"] = res["readout_fused"]["time_s"] / res["readout_naive"]["time_s"]
    out["router_time_ratio"] = res["routers_batched"]["time_s"] / res["routers_loop"]["time_s"]
    # the two sides computed the same thing (sums of lse; the focal loss)
    out["readout_lse_sum_rel_diff"] = abs(res["readout_fused"]["value"] - res["readout_naive"]["value"]) / max(
        1e-9, abs(res["readout_naive"]["value"])
    )
    out["router_loss_rel_diff"] = abs(res["routers_batched"]["value"] - res["routers_loop"]["value"]) / max(
        1e-9, abs(res["routers_loop"]["value"])
    )
    return out


def main(shapes: tuple[str, ...] = ("tiny", "large"), device: str | None = None, repeats: int = 3, progress=True):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown bench shapes {sorted(unknown)}; known: {sorted(SHAPES)}")
    report: dict = {
        "device": device,
        "repeats": repeats,
        "work": {
            "readout": "S layers -> final RMSNorm -> LM head: lse, max log-prob + argmax, entropy, target log-prob "
            "(forward)",
            "routers": f"L routers ({ROUTER_HIDDEN} hidden, {NUM_WINDOWS} windows) focal loss, forward + backward",
        },
    }
    for name in shapes:
        report[name] = bench_shape(SHAPES[name], device, repeats, progress, name)
    return report
