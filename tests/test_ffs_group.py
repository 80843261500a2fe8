"""FFS groups (``rollout.algorithm: ffs``): finish order, who enters the loss, rewards in finish
order with aborted members at 0, the HF race closing at k finishers, and a budgeted training run."""

import json
from types import SimpleNamespace

import pytest

from rollout.ffs_group import FFSGroupConfig, ffs_group_rollout, ffs_members, finish_order
from rollout.types import ANSWER, THINK, Generation, RolloutBatch, RolloutSequence, SamplingConfig


def _g(n, finish):
    return Generation([1], list(range(n)), [0.0] * n, finish)


def test_finish_order_puts_finishers_shortest_first_then_the_aborted():
    gens = [_g(9, "abort"), _g(7, "stop"), _g(4, "stop"), _g(9, "length"), _g(7, "stop")]
    assert finish_order(gens) == [2, 1, 4, 0, 3]  # 4 < 7 = 7 (tie by index), then unfinished in order


def _seq(gid, n, finish):
    return RolloutSequence(gid, [1], list(range(n)), [THINK] * (n - 1) + [ANSWER], [0.0] * n, n - 1, True, finish)


def test_ffs_members_drop_or_keep_the_aborted():
    seqs = [_seq(0, 3, "stop"), _seq(0, 5, "stop"), _seq(0, 5, "abort"), _seq(1, 4, "stop"), _seq(1, 4, "abort")]
    batch = RolloutBatch(seqs, 2)
    assert ffs_members(batch, "drop") == [[0, 1], [3]]
    assert ffs_members(batch, "zero") == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="rollout.ffs.aborted"):
        ffs_members(batch, "keep")


def test_rewards_decay_in_finish_order_and_the_aborted_earn_nothing(quick_model_dir):
    """Members in finish order: a wrong finisher, two right ones, one aborted whose text happens to hold
    the right answer. Decaying reward: first correct 1, second 0.5; the aborted one 0, never 'correct'."""
    from rl.data.problems import Problem
    from rl.trainer.config import TrainConfig
    from rl.trainer.step import step_rewards
    from rollout.backends.hf import HFBackend

    tok = HFBackend.from_pretrained(str(quick_model_dir)).tokenizer
    cfg = TrainConfig()
    cfg.rollout.algorithm = "ffs"
    seqs = [_seq(0, 3, "stop"), _seq(0, 4, "stop"), _seq(0, 5, "stop"), _seq(0, 6, "abort")]
    verifier = SimpleNamespace(verify=lambda texts, golds: [False, True, True, True])
    problems = [Problem("p0", "Start at 1.", "3")]
    correct, rewards = step_rewards(seqs, [[0, 1, 2, 3]], problems, tok, cfg, verifier)
    assert correct == [False, True, True, False]
    assert rewards == [0.0, 1.0, 0.5, 0.0]
    cfg.rollout.algorithm = "sgrpo"  # the same verdicts in a serial group: the last member counts
    _, rewards = step_rewards(seqs, [[0, 1, 2, 3]], problems, tok, cfg, verifier)
    assert rewards == [0.0, 1.0, 0.5, 0.25]


def test_hf_race_closes_once_k_samples_finished(quick_model_dir):
    """Rows 0 and 1 of each prompt are forced to emit EOS at steps 3 and 6: with k = 2 the group closes
    at step 6, the two finishers come first (shortest first) with 'stop', the other two are aborted at
    the same length, and the token count includes the aborted tokens."""
    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend

    be = HFBackend.from_pretrained(str(quick_model_dir))
    tok = be.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(2)]
    n = 4

    def force_eos(step, rows, scores):
        scores[:, eos] = -float("inf")  # nobody else finishes by chance
        for row_in_group, at in ((1, 3), (0, 6)):
            if step == at:
                forced = rows % n == row_in_group
                scores[forced] = -float("inf")
                scores[forced, eos] = 0.0
        return scores

    be.logits_processor = force_eos
    sampling = SamplingConfig(max_tokens=64, temperature=1.0, seed=5)
    batch = ffs_group_rollout(be, prompts, sampling, FFSGroupConfig(n=n, finishers=2, aborted="drop"))
    groups = batch.groups()
    assert len(groups) == 2
    for g in groups:
        assert [s.finish_reason for s in g] == ["stop", "stop", "abort", "abort"]
        assert [len(s.completion_ids) for s in g] == [4, 7, 7, 7]
        assert all(s.is_full for s in g)
    assert batch.stats["finished"] == 4 and batch.stats["aborted"] == 4
    assert batch.stats["full_tokens"] == 2 * (4 + 7 + 7 + 7)
    assert ffs_members(batch, "drop") == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match="rollout.ffs.finishers"):
        ffs_group_rollout(be, prompts, sampling, FFSGroupConfig(n=2, finishers=3))


def test_ffs_run_stops_at_its_rollout_token_budget_and_resumes_with_it(quick_model_dir, tmp_path, monkeypatch):
    """A budget far below run.steps' worth stops the run early (checkpoint + summary at that step);
    rerunning with a larger budget resumes and counts on from the tokens already spent."""
    from rl.trainer.loop import train
    from tests.test_train import _alternating_rewards, _cfg

    _alternating_rewards(monkeypatch)
    extra = ["rollout.algorithm=ffs", "rollout.ffs.n=4", "rollout.ffs.finishers=2", "run.steps=50"]
    s1 = train(_cfg(quick_model_dir, tmp_path, *extra, "run.rollout_token_budget=600"))
    assert 1 <= s1["steps"] < 50
    assert s1["rollout_tokens"] >= 600
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rollout/tokens_total"] == s1["rollout_tokens"]
    assert rows[-2]["rollout/tokens_total"] < 600  # it stopped at the first step past the budget
    assert sum(r["rollout/tokens"] for r in rows) == s1["rollout_tokens"]
    assert "rollout/aborted" in rows[-1]
    assert (tmp_path / "checkpoints" / f"step-{s1['steps']:06d}").is_dir()

    s2 = train(_cfg(quick_model_dir, tmp_path, *extra, f"run.rollout_token_budget={s1['rollout_tokens'] + 300}"))
    assert s2["steps"] > s1["steps"]
    assert s1["rollout_tokens"] + 300 <= s2["rollout_tokens"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rollout/tokens_total"] == s2["rollout_tokens"]
