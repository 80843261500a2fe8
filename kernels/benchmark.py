"""``exitrl bench logprob``: fused log-prob vs the naive full-logits path vs TRL's selective_log_softmax.

Forward + backward (gradients for hidden and the LM head) at Qwen3-like shapes. Each variant runs in
its own subprocess so peak-memory readings do not mix: on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs) minus the resident set after the inputs exist, minus the bytes of their gradients; on CUDA ``torch.cuda.max_memory_allocated`` beyond the same baseline.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("fused", "naive", "trl")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _loss(variant: str, h, w, y):
    if variant == "fused":
        from kernels.fused_logprob import fused_logprob

        return fused_logprob(h, w, y).sum()
    logits = (h @ w.T).float()
    if variant == "naive":
        return torch.log_softmax(logits, -1).gather(-1, y[:, None]).sum()
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, y).sum()


def run_variant(variant: str, n: int, v: int, d: int, dtype: str, device: str, repeats: int) -> dict:
    """Time and peak memory of one variant (call in a fresh process)."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(n, d, device=device) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(v, d, device=device) * 0.02).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()  # the gradients count as inputs
    cuda = device.startswith("cuda")
    times, peaks = [], []
    for i in range(repeats + 1):
        h.grad = w.grad = None  # as after optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_kb("VmRSS:") * 1024
            _reset_peak()
        t0 = time.perf_counter()
        _loss(variant, h, w, y).backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base - grad_bytes
        else:
            peak = _rss_kb("VmHWM:") * 1024 - base - grad_bytes
        if i > 0:  # first run is warm-up
            times.append(time.perf_counter() - t0)
            peaks.append(peak)
    flops = 3 * 2 * n * v * d  # forward logits + two backward matmuls
    t = statistics.median(times)
    return {"variant": variant, "time_s": t, "peak_bytes": max(peaks), "tflops": flops / t / 1e12}


def main(n: int = 1024, v: int = 151936, d: int = 1024, dtype: str = "float32", device: str | None = None,
         repeats: int = 2, variants: tuple[str, ...] = VARIANTS) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = {}
    for variant in variants:
        code = (
            "import json,sys; from kernels.benchmark import run_variant; "
            f"print(json.dumps(run_variant({variant!r}, {n}, {v}, {d}, {dtype!r}, {device!r}, {repeats})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench variant {variant} failed:\n{out.stderr[-2000:]}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    report = {
        "shape": {"N": n, "V": v, "d": d, "dtype": dtype, "device": device},
        **{f"{k}_{m}": res[k][m] for k in res for m in ("time_s", "peak_bytes")},
    }
    if "fused" in res and "naive" in res:
        report["mem_ratio"] = res["fused"]["peak_bytes"] / max(1, res["naive"]["peak_bytes"])
        report["time_ratio"] = res["fused"]["time_s"] / res["naive"]["time_s"]
    if "fused" in res and "trl" in res:
        report["mem_ratio_vs_trl"] = res["fused"]["peak_bytes"] / max(1, res["trl"]["peak_bytes"])
        report["time_ratio_vs_trl"] = res["fused"]["time_s"] / res["trl"]["time_s"]
    report["fused_tflops"] = res.get("fused", {}).get("tflops")
    return report
