"""Benchmark worker processes: one variant per process (peak-memory readings do not mix), driven by
``run`` lines on stdin, each answered by one JSON line; and the peak-memory probe they use.

On CPU, time and memory come from different workers. The peak resident set only measures memory if
freed memory leaves the process: glibc keeps freed blocks resident and hands them out again, so a
second pass allocates without raising the peak (readings fell from 34 MiB to 0 between rounds).
Memory workers therefore run with ``MEMORY_ENV`` (every block of 64 KiB or more is its own mapping,
returned on free; the heap is trimmed) and one measured pass; that makes every large allocation a
page fault, so timing workers keep the default allocator."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def rss_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS:`` now, ``VmHWM:`` the peak since the reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Reset this process's peak resident set (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Worker:
    """A Python process running ``code`` (which prints ``ready``, then answers each ``run`` line on
    stdin with one JSON line)."""

    def __init__(self, variant: str, code: str, env: dict[str, str] | None = None):
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench variant {self.variant} failed:\n{self.proc.stderr.read()[-2000:]}")
        return line.strip()

    def ready(self) -> None:
        if self._line() != "ready":
            raise RuntimeError(f"bench variant {self.variant}: unexpected start-up output")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_round_robin(workers: list[Worker], repeats: int, label: str, progress: bool = True) -> dict[str, dict]:
    """Start ``workers``, then ``repeats + 1`` rounds (round 0 warms up) in a rotating order, so no
    variant always runs first or last; closes them. Returns per variant the median ``time_s``, the
    largest ``peak_bytes`` and the last ``value`` (None if the worker reports none)."""
    runs: dict[str, list[dict]] = {wk.variant: [] for wk in workers}
    try:
        for wk in workers:
            wk.ready()
        for rnd in range(repeats + 1):
            order = workers[rnd % len(workers) :] + workers[: rnd % len(workers)]
            for wk in order:
                r = wk.run()
                if rnd:
                    runs[wk.variant].append(r)
                if progress:
                    print(
                        f"[bench {label}] round {rnd}/{repeats} {wk.variant}: {r['time_s']:.3f} s, "
                        f"peak {r['peak_bytes'] / 2**20:.1f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for wk in workers:
            wk.close()
    return {
        k: {
            "time_s": statistics.median(x["time_s"] for x in rs),
            "peak_bytes": max(x["peak_bytes"] for x in rs),
            "value": rs[-1].get("value"),
        }
        for k, rs in runs.items()
    }


def measure(make_worker, variants, repeats: int, label: str, device: str, progress: bool = True) -> dict[str, dict]:
    """``run_round_robin`` over ``make_worker(variant, env)`` workers. On CPU ``time_s`` comes from
    default-allocator workers and ``peak_bytes`` from ``MEMORY_ENV`` workers (one measured pass
    after the warm-up); on CUDA both come from the same workers (the allocator's own peak)."""
    res = run_round_robin([make_worker(v, None) for v in variants], repeats, label, progress)
    if not device.startswith("cuda"):
        mem = run_round_robin([make_worker(v, MEMORY_ENV) for v in variants], 1, f"{label} memory", progress)
        for k in res:
            res[k]["peak_bytes"] = mem[k]["peak_bytes"]
    return res
