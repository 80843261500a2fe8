"""Bench workers: the CPU peak-memory reading counts what a pass allocates, in every round."""

from __future__ import annotations

from rl.bench.exit_head import SHAPES, _worker
from rl.bench.workers import MEMORY_ENV, measure


def test_memory_workers_read_the_same_peak_every_round():
    """The naive read-out at the tiny shape holds one layer's [N, V] fp32 logits and a few
    same-sized temporaries (N 2048, V 384: 3 MiB each). Under ``MEMORY_ENV`` every round reads
    the same peak, at least those logits (the default allocator's readings ranged 0 to 87 MiB
    over five rounds of the same pass); ``measure`` reports that reading."""
    shape = SHAPES["tiny"]
    logits = shape["N"] * shape["V"] * 4
    w = _worker("readout_naive", shape, "cpu", MEMORY_ENV)
    try:
        w.ready()
        w.run()  # warm-up
        peaks = [w.run()["peak_bytes"] for _ in range(3)]
    finally:
        w.close()
    assert min(peaks) >= 3 * logits
    assert max(peaks) <= 1.1 * min(peaks)
    res = measure(lambda v, env: _worker(v, shape, "cpu", env), ["readout_naive"], 1, "test", "cpu", progress=False)
    assert abs(res["readout_naive"]["peak_bytes"] - min(peaks)) <= 0.1 * min(peaks)
