"""First Finish Search inside the engine: the ``n`` samples of one request race, and the step after the
first of them finishes on its own, the engine makes every other sample write its end-of-sequence
token. The losers end one step after their winner (two for a sample that joined the batch a step
late) without waiting for an abort from outside, however busy the API server and the front end are
(``rl.serving.first_finish`` answers from the winner's finish and closes the stream besides).

Loaded by the server with ``--logits-processors ...:FirstFinishRaceProcessor`` (after the thinking
budget's processor, so a forced end wins over a forced exit prompt). A request takes part through
``vllm_xargs``: ``{"ffs_race": "<an id unique to the request>"}``; vLLM gives each of its ``n``
samples the same arguments, so the id is what ties the samples of a race together.

The rule (``RaceBook``), from what the engine's persistent batch tells a logits processor (a sample
leaves when its slot is listed as removed, or when another sample is added or moved into its slot):

    a sample that leaves the batch with a stop token as its last output finished on its own:
        its race is won at that sample's length W (the shortest finisher, if several leave together)
    while a race is won, each of its samples with at least W output tokens must emit EOS next
        (a sample preempted and resumed with fewer keeps sampling until it reaches W)

so every sample the race ended is longer than the winner: "the shortest sample that finished" still
names the winner in a reply that holds all of them. A sample that leaves for another reason
(preemption, an abort, a stop string found outside the engine) wins nothing. A race is forgotten
when its last sample leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

XARG_RACE = "ffs_race"
MAX_RACE_ID = 64


def check_race_args(xa: dict) -> str | None:
    """What is wrong with a request's race id (``vllm_xargs``), or None."""
    if XARG_RACE not in xa:
        return None
    r = xa[XARG_RACE]
    if not isinstance(r, str) or not 1 <= len(r) <= MAX_RACE_ID:
        return f"{XARG_RACE} must be a string of 1 to {MAX_RACE_ID} characters, got {r!r}"
    return None


@dataclass
class RaceRow:
    race: str
    out: Sequence[int]  # the engine's live list of the sample's output ids
    stop_ids: frozenset[int]
    eos_id: int


class RaceBook:
    """Which batch rows race, which races are won and at what length (see the module). Pure: the
    logits processor feeds it the batch's updates and asks it which rows must end."""

    def __init__(self):
        self.rows: dict[int, RaceRow] = {}
        self.won: dict[str, int] = {}  # race -> the winner's output length

    def remove(self, index: int) -> None:
        """The sample at ``index`` left the batch (finished, preempted or aborted)."""
        row = self.rows.pop(index, None)
        if row is None:
            return
        if row.out and row.out[-1] in row.stop_ids:  # finished on its own
            self.won[row.race] = min(len(row.out), self.won.get(row.race, len(row.out)))
        if row.race in self.won and not any(r.race == row.race for r in self.rows.values()):
            self.won.pop(row.race, None)  # the race's last sample left

    def add(self, index: int, row: RaceRow | None) -> None:
        """A sample joined at ``index``; the one there before left (vLLM reuses a freed slot without
        listing it as removed)."""
        self.remove(index)
        if row is not None:
            self.rows[index] = row

    def move(self, a: int, b: int, swap: bool) -> None:
        """A swap of two samples, or the sample at ``a`` moved into ``b``, whose sample left (vLLM
        fills a freed slot from the batch's end without listing it as removed)."""
        if swap:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if rb is not None:
                self.rows[a] = rb
        else:
            self.remove(b)  # first: the moving sample still counts as in its race
            ra = self.rows.pop(a, None)
        if ra is not None:
            self.rows[b] = ra

    def forced(self) -> Iterable[tuple[int, int]]:
        """(row, EOS id) for every sample the race has ended."""
        for index, row in self.rows.items():
            w = self.won.get(row.race)
            if w is not None and len(row.out) >= w:
                yield index, row.eos_id


def race_row(params, output_ids: Sequence[int]) -> RaceRow | None:
    """The row of a sample whose request races (its ``vllm_xargs`` name a valid race id and it can
    end: an EOS id, EOS not ignored), else None."""
    xa = params.extra_args or {}
    if XARG_RACE not in xa or check_race_args(xa) is not None:
        return None
    eos = params.eos_token_id
    if eos is None or params.ignore_eos:
        return None
    stops = frozenset(params.all_stop_token_ids) | {eos}
    return RaceRow(race=xa[XARG_RACE], out=output_ids, stop_ids=stops, eos_id=eos)


def _make_processor_class():
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class FirstFinishRaceProcessor(LogitsProcessor):
        """Ends a race's other samples once one finished (see the module)."""

        @classmethod
        def validate_params(cls, params) -> None:
            problem = check_race_args(params.extra_args or {})
            if problem is not None:
                raise ValueError(problem)

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.book = RaceBook()

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy output too

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if not batch_update:
                return
            for index in batch_update.removed:  # vLLM's order: removed, added, moved
                self.book.remove(index)
            for index, params, _prompt, out in batch_update.added:
                self.book.add(index, race_row(params, out))
            for a, b, direction in batch_update.moved:
                self.book.move(a, b, swap=direction == MoveDirectionality.SWAP)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for row, eos in self.book.forced():
                if 0 <= row < logits.shape[0]:
                    logits[row].fill_(float("-inf"))
                    logits[row, eos] = 0.0
            return logits

    return FirstFinishRaceProcessor


def __getattr__(name: str):
    # vLLM is imported only when the server loads the class (the book above stays importable without it)
    if name == "FirstFinishRaceProcessor":
        cls = _make_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
