"""Branch buckets (``rollout/backends/branch_buckets.py``): the cost-minimising split of sorted
cuts, against costs worked out by hand, and the in-place branch cache (``left_padded_cache``)."""

import pytest
import torch

from rollout.backends.branch_buckets import min_cost_buckets


def test_split_pays_when_padding_saved_exceeds_the_bucket_cost():
    # one bucket: 3 rows x 100 = 300; two: 2 x 10 + 1 x 100 = 120 (+ one more bucket_cost)
    assert min_cost_buckets([10, 10, 100], extra=0, bucket_cost=0) == [[0, 1], [2]]
    assert min_cost_buckets([10, 10, 100], extra=0, bucket_cost=179) == [[0, 1], [2]]  # 300+179 > 120+358
    assert min_cost_buckets([10, 10, 100], extra=0, bucket_cost=181) == [[0, 1, 2]]  # 300+181 < 120+362


def test_the_cheapest_of_all_contiguous_splits():
    # cuts 5, 50, 55, 60; extra 10; bucket 30. By hand:
    #   {all}            4*70 + 30          = 310
    #   {5} {50,55,60}   15 + 3*70 + 60     = 285   <- least
    #   {5,50} {55,60}   2*60 + 2*70 + 60   = 320
    #   {5} {50} {55,60} 15 + 60 + 140 + 90 = 305
    #   {5} {50,55} {60} 15 + 130 + 70 + 90 = 305
    # given out of order, indices come back grouped by ascending cut
    assert min_cost_buckets([60, 5, 55, 50], extra=10, bucket_cost=30) == [[1], [3, 2, 0]]


def test_equal_cuts_share_a_bucket_and_every_index_appears_once():
    # grid 2 puts a candidate boundary after the 3rd of five equal cuts: it moves to their end
    cuts = [7, 7, 7, 7, 7, 8]
    assert min_cost_buckets(cuts, extra=0, bucket_cost=0, grid=2) == [[0, 1, 2, 3, 4], [5]]
    rng = torch.Generator().manual_seed(0)
    cuts = torch.randint(70, 320, (512,), generator=rng).tolist()
    buckets = min_cost_buckets(cuts, extra=22, bucket_cost=13_000)
    assert sorted(i for b in buckets for i in b) == list(range(512))
    assert 1 < len(buckets) <= 32
    assert all(max(cuts[i] for i in a) <= min(cuts[i] for i in b) for a, b in zip(buckets, buckets[1:]))


def test_bucket_cost_is_checked_and_no_cuts_make_no_buckets():
    assert min_cost_buckets([], extra=5) == []
    with pytest.raises(ValueError, match="bucket_cost"):
        min_cost_buckets([3], extra=0, bucket_cost=-1)


def test_left_padded_cache_writes_prefixes_in_place(quick_model_dir, monkeypatch):
    from transformers import AutoConfig

    from rollout.backends.decode_loop import left_padded_cache

    config = AutoConfig.from_pretrained(quick_model_dir)
    H, hd, L = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    lens = [3, 7, 5]
    prefixes = [[(torch.randn(H, c, hd), torch.randn(H, c, hd)) for _ in range(L)] for c in lens]
    # stale non-finite memory under the pad columns must not survive: fresh buffers come NaN-filled
    new_empty = torch.Tensor.new_empty

    def nan_filled(self, size, **kw):
        return new_empty(self, size, **kw).fill_(torch.nan)

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled)
    cache = left_padded_cache(config, prefixes, reserve=4)
    monkeypatch.undo()
    assert cache.get_seq_length() == 7
    for layer, cached in enumerate(cache.layers):
        assert cached.buffers[0].shape == (3, H, 7 + 4, hd)
        for b, c in enumerate(lens):
            k, v = prefixes[b][layer]
            assert torch.equal(cached.keys[b, :, 7 - c :], k) and torch.equal(cached.values[b, :, 7 - c :], v)
            assert not cached.keys[b, :, : 7 - c].any() and not cached.values[b, :, : 7 - c].any()
    # a decode step writes its column into the same buffers (no reallocation within the reserve)
    buf = cache.layers[0].buffers[0]
    new_k, new_v = torch.randn(3, H, 1, hd), torch.randn(3, H, 1, hd)
    keys, _ = cache.update(new_k, new_v, 0)
    assert cache.layers[0].buffers[0] is buf and keys.shape[2] == 8 and torch.equal(buf[:, :, 7:8], new_k)


def test_bench_rollout_profile_on_hf_times_the_branch_phase_both_ways(quick_model_dir, monkeypatch):
    from rl.bench.rollout import compare
    from rollout.backends.hf import HFBackend

    be = HFBackend.from_pretrained(str(quick_model_dir), batch_size=64)
    monkeypatch.setattr(be, "branch_bucket_cost", 0.0)  # a bucket per quantile of cuts
    rep = compare(be, n_prompts=6, exits=2, max_tokens=40, answer_max_tokens=6, repeats=2, profile=True)
    prof = rep["profile"]
    assert prof["kv_from_full_rollouts"] and prof["bucket_cost"] == 0.0
    assert sum(prof["bucket_rows"]) == prof["branches"] and 1 < len(prof["bucket_rows"])
    lo_hi = prof["bucket_cut_ranges"]
    assert all(lo <= hi for lo, hi in lo_hi) and all(a[1] < b[0] for a, b in zip(lo_hi, lo_hi[1:]))
    # (the medians are rounded to ms: a few ms each on this tiny case)
    assert prof["buckets_vs_one_batch"] == pytest.approx(prof["buckets_s"] / prof["one_batch_s"], rel=0.2)
    assert be.branch_bucket_cost == 0.0 and "generate_branches" not in vars(be)  # the backend left as it was
    assert "block_aligned_ratio" not in rep  # a vLLM what-if
