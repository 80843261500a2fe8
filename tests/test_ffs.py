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
