"""Benchmark worker processes: one variant per process (peak-memory readings do not mix), driven by
``run`` lines on stdin, each answered by one JSON line; and the peak-memory probe they use."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


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

    def __init__(self, variant: str, code: str):
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
