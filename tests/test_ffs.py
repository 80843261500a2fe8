"""First Finish Search token accounting and majority voting."""

from rollout.ffs import FFSResult, first_finish_search, majority_vote, pick_first_finished
from rollout.types import Generation, SamplingConfig


def _g(n, finish):
    return Generation([1], list(range(n)), [0.0] * n, finish)


def test_ffs_accounting_on_constructed_samples():
    samples = [_g(7, "abort"), _g(5, "stop"), _g(7, "abort"), _g(6, "abort")]
    r = FFSResult(pick_first_finished(samples), samples)
    assert r.winner is samples[1]
    assert r.sequential_tokens == 5
    assert r.total_tokens == 7 + 5 + 7 + 6
    # nobody finished (all hit the length limit): the shortest is returned
    r2 = FFSResult(pick_first_finished([_g(9, "length"), _g(8, "length")]), [])
    assert r2.winner.num_tokens == 8


def test_majority_vote():
    assert majority_vote(["3", "4", "3", None]) == "3"
    assert majority_vote(["4", "3", "3", "4"]) == "4"  # tie -> first seen
    assert majority_vote([None, ""]) is None


def test_hf_first_finish_stops_the_other_samples(quick_model_dir):
    """Row 0 of each prompt is made to emit EOS at step 6 (a logits processor): it wins with 'stop',
    and every other sample of its prompt is stopped at the same step ('abort', same length)."""

    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend

    be = HFBackend.from_pretrained(str(quick_model_dir))
    tok = be.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(3)]
    n, at = 4, 6

    def force_eos(step, rows, scores):
        if step == at:
            forced = rows % n == 0
            scores[forced] = -float("inf")
            scores[forced, eos] = 0.0
        return scores

    be.logits_processor = force_eos
    results = first_finish_search(be, prompts, SamplingConfig(max_tokens=160, temperature=1.0, n=n, seed=3))
    assert len(results) == 3
    for r in results:
        assert len(r.samples) == n
        assert r.winner.finish_reason == "stop" and r.winner.num_tokens == at + 1
        assert all(s.num_tokens <= r.winner.num_tokens for s in r.samples)
        assert sum(s.finish_reason == "abort" for s in r.samples) >= n - 2  # the rest stopped, unfinished
        assert r.total_tokens == sum(s.num_tokens for s in r.samples) > r.sequential_tokens == at + 1


# ------------------------------------------------------------------ the race inside vLLM (RaceBook)


def _row(race: str, out: list[int]):
    from rollout.first_finish_race import RaceRow

    return RaceRow(race=race, out=out, stop_ids=frozenset({2, 7}), eos_id=2)


def test_race_book_ends_the_others_the_step_after_the_first_finish():
    from rollout.first_finish_race import RaceBook

    book = RaceBook()
    outs = {i: [5] * 11 for i in range(4)}  # four samples of race "a", 11 tokens each
    for i, out in outs.items():
        book.add(i, _row("a", out))
    book.add(4, _row("b", [5] * 3))  # another request's sample
    assert list(book.forced()) == []
    outs[1].append(2)  # sample 1 writes EOS (its 12th token) and leaves the batch
    for i in (0, 2, 3):
        outs[i].append(5)
    book.remove(1)
    assert book.won == {"a": 12}
    assert sorted(book.forced()) == [(0, 2), (2, 2), (3, 2)]  # all of race a, none of race b: EOS next
    for i in (0, 2, 3):  # each ends at 13 tokens: longer than the winner's 12
        book.remove(i)
    assert book.won == {} and list(book.rows) == [4]  # the race is forgotten with its last sample


def test_race_book_a_preempted_sample_wins_nothing_and_a_short_one_catches_up_first():
    from rollout.first_finish_race import RaceBook

    book = RaceBook()
    a, b, c = [5] * 8, [5] * 8, [5] * 8
    book.add(0, _row("r", a))
    book.add(1, _row("r", b))
    book.add(2, _row("r", c))
    book.remove(2)  # preempted: its last token is no stop token
    assert book.won == {}
    a.append(7)  # a user stop token id ends sample 0 on its own at 9 tokens
    b.append(5)
    book.remove(0)
    assert book.won == {"r": 9}
    book.add(0, _row("r", c))  # sample 2 resumed (recomputed) with 8 tokens: shorter than the winner
    assert list(book.forced()) == [(1, 2)]  # it samples on until it has 9, so it ends longer than 9
    c.append(5)
    assert sorted(book.forced()) == [(0, 2), (1, 2)]


def test_race_book_reads_a_reused_or_filled_slot_as_the_old_sample_leaving():
    from rollout.first_finish_race import RaceBook

    book = RaceBook()
    w, x, y = [5, 2], [5, 5], [5, 5]
    book.add(0, _row("r", w))
    book.add(1, _row("r", x))
    book.add(2, _row("r", y))
    book.move(2, 0, swap=False)  # vLLM condenses: sample 2 fills slot 0, whose finished sample left
    assert book.won == {"r": 2} and sorted(book.forced()) == [(0, 2), (1, 2)]
    book.move(0, 1, swap=True)
    assert book.rows[0].out is x and book.rows[1].out is y
    book.add(1, _row("s", [5]))  # a new request takes slot 1: sample y left without a stop token
    assert book.won == {"r": 2} and list(book.forced()) == [(0, 2)]
    book.remove(0)
    assert book.won == {}  # race r has no sample left


def test_race_arguments_are_checked_at_admission():
    from rollout.first_finish_race import check_race_args

    assert check_race_args({}) is None and check_race_args({"ffs_race": "ab12"}) is None
    assert "ffs_race must be a string" in check_race_args({"ffs_race": 3})
    assert "ffs_race must be a string" in check_race_args({"ffs_race": "x" * 65})
