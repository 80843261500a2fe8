"""Batch verification in isolated worker processes with a hard per-item time bound.

A hang, a crash or a memory blow-up inside the LaTeX parser or sympy costs one item a ``False`` and
a logged warning, never the run: each worker is a separate process with an address-space limit;
an item that overruns its bound gets its worker killed and replaced.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from rewards.verify import VerifyConfig, verify_answer

log = logging.getLogger(__name__)


@dataclass
class BatchVerifierConfig:
    """Settings of the isolated batch verifier."""

    workers: int = field(default=2, metadata={"help": "worker processes"})
    timeout_s: float = field(default=5.0, metadata={"help": "hard wall-clock bound per item"})
    memory_limit_mb: int = field(default=4096, metadata={"help": "address-space limit of each worker (0 = none)"})
    startup_timeout_s: float = field(
        default=120.0, metadata={"help": "how long a new worker may take to start (imports)"}
    )


def _worker_main(conn: Connection, memory_limit_mb: int, verify_config: VerifyConfig) -> None:
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import math_verify  # noqa: F401  (import once, before the first item)

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs whole inputs on timeouts
    conn.send("ready")  # start-up (interpreter + imports) never counts against an item's bound

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, response, gold, mc = msg
        try:
            verdict = verify_answer(response, gold, verify_config, multiple_choice=mc)
        except MemoryError:
            verdict = False
        conn.send((idx, verdict))


class _Worker:
    def __init__(self, ctx, cfg: BatchVerifierConfig, verify_config: VerifyConfig):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, cfg.memory_limit_mb, verify_config), daemon=True)
        self.proc.start()
        child.close()
        self.item: int | None = None
        self.deadline = 0.0
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Block until the worker finished starting (True) or died / took longer than ``timeout``."""
        if not self.ready:
            try:
                self.ready = self.conn.poll(timeout) and self.conn.recv() == "ready"
            except (EOFError, OSError):
                self.ready = False
        return self.ready

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class BatchVerifier:
    """``verify(responses, golds) -> list[bool]`` over a pool of isolated workers.

    Use as a context manager (or call ``close()``); workers are started lazily and reused across
    calls, so the Math-Verify import is paid once.
    """

    def __init__(self, config: BatchVerifierConfig | None = None, verify_config: VerifyConfig | None = None):
        self.config = config or BatchVerifierConfig()
        self.verify_config = verify_config or VerifyConfig()
        self._ctx = mp.get_context("spawn")  # no fork of a process holding torch / vLLM threads
        self._workers: list[_Worker] = []
        self.stats = {"timeouts": 0, "crashes": 0, "items": 0}

    def __enter__(self) -> BatchVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.kill()
        self._workers = []

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.config, self.verify_config)

    def verify(
        self, responses: Sequence[str], golds: Sequence[str], multiple_choice: Sequence[bool | None] | None = None
    ) -> list[bool]:
        if len(responses) != len(golds):
            raise ValueError(f"responses ({len(responses)}) and golds ({len(golds)}) differ in length")
        mc = list(multiple_choice) if multiple_choice is not None else [None] * len(responses)
        n = len(responses)
        results: list[bool] = [False] * n
        if n == 0:
            return results
        while len(self._workers) < min(self.config.workers, n):
            self._workers.append(self._spawn())
        pending = list(range(n - 1, -1, -1))  # stack, item 0 first
        busy: dict[Connection, _Worker] = {}

        def dispatch(w: _Worker) -> None:
            for _ in range(3):  # a worker that fails to start is replaced, never charged to an item
                if w.wait_ready(self.config.startup_timeout_s):
                    break
                log.warning("verifier worker (pid %s) did not start; replacing it", w.proc.pid)
                w = self._replace(w)
            else:
                raise RuntimeError("verifier workers fail to start (see the log above)")
            i = pending.pop()
            w.item, w.deadline = i, time.monotonic() + self.config.timeout_s
            w.conn.send((i, responses[i], golds[i], mc[i]))
            busy[w.conn] = w

        for w in self._workers:
            if pending:
                dispatch(w)
        while busy:
            timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            ready = wait(list(busy), timeout=timeout)
            for conn in ready:
                w = busy.pop(conn)
                try:
                    idx, verdict = conn.recv()
                    results[idx] = bool(verdict)
                except (EOFError, OSError):  # the worker died (crash, OOM kill)
                    self.stats["crashes"] += 1
                    log.warning("verifier worker crashed on item %d (pid %s); counted as False", w.item, w.proc.pid)
                    w = self._replace(w)
                if pending:
                    dispatch(w)
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if now >= w.deadline:
                    busy.pop(conn)
                    self.stats["timeouts"] += 1
                    log.warning(
                        "verification of item %d exceeded %.1fs; counted as False", w.item, self.config.timeout_s
                    )
                    w = self._replace(w)
                    if pending:
                        dispatch(w)
        self.stats["items"] += n
        return results

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        new = self._spawn()
        self._workers[self._workers.index(w)] = new
        return new


def verify_batch(
    responses: Sequence[str], golds: Sequence[str], config: BatchVerifierConfig | None = None
) -> list[bool]:
    """One-shot convenience: start workers, verify, stop them."""
    with BatchVerifier(config) as bv:
        return bv.verify(responses, golds)
