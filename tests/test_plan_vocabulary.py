"""Robust router labels: the plan vocabulary and the consolidation rule, on hand-made numbers."""

import torch

from rl.routing.plan_vocabulary import plan_vocabulary, robust_labels


def test_vocabulary_ranks_plans_by_how_often_the_search_found_them_correct():
    rows = [
        {"plan": [1, 0, 0], "full_correct": True, "passing": [[1, 1, 1], [1, 0, 1], [1, 0, 0]]},
        {"plan": [1, 1, 0], "full_correct": True, "passing": [[1, 1, 1], [1, 0, 1], [1, 1, 0]]},
        {"plan": [1, 0, 1], "full_correct": True, "passing": [[1, 1, 1], [1, 0, 1]]},
        {"plan": [1, 1, 1], "full_correct": False, "passing": []},
        {"plan": [0, 1, 1], "full_correct": True},  # a row of an older file: its label counts once
    ]
    vocab = plan_vocabulary(rows, 3, vocab_size=2)
    # [1,0,1] found 3 times; [1,0,0], [1,1,0], [0,1,1] once each: the tie goes to fewer passes, then first seen
    assert vocab == [(1, 0, 1), (1, 0, 0), (1, 1, 1)]
    assert plan_vocabulary([], 2, 4) == [(1, 1)]


def test_plans_as_costly_as_all_execute_take_no_slot():
    # a repeat (4 passes) and a skip paid back by a repeat (3) pass everywhere, but a label is the
    # shortest passing plan: they could never beat all-execute, so the cheap plan gets the slot
    rows = [
        {"plan": [1, 0, 1], "full_correct": True, "passing": [[1, 1, 1], [2, 1, 1], [0, 2, 1], [1, 0, 1]]},
        {"plan": [1, 1, 1], "full_correct": True, "passing": [[1, 1, 1], [2, 1, 1], [0, 2, 1]]},
    ]
    assert plan_vocabulary(rows, 3, vocab_size=1) == [(1, 0, 1), (1, 1, 1)]


def test_labels_take_the_shortest_plan_that_holds_on_most_problems():
    vocab = [(1, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    passes = torch.tensor(
        [
            [1, 1, 0, 1],
            [0, 0, 1, 1],
            [0, 1, 0, 1],
            [1, 1, 0, 1],
            [0, 0, 0, 0],  # the full model is wrong here: not counted in the rates, label all-execute
        ],
        dtype=torch.bool,
    )
    labels, rates = robust_labels(vocab, passes, min_pass_rate=0.75)
    assert rates == [0.5, 0.75, 0.25, 1.0]  # over the 4 problems the full model solves
    # (1,0,0) is the shortest but holds on half the problems only: (1,0,1) where it passes, else all
    assert labels == [1, 3, 1, 1, 3]
    labels, _ = robust_labels(vocab, passes, min_pass_rate=0.5)
    assert labels == [0, 3, 1, 0, 3]  # now (1,0,0) is robust enough where it passes
    labels, _ = robust_labels(vocab, passes, min_pass_rate=0.0)
    assert labels == [0, 2, 1, 0, 3]  # the search's rule: shortest passing (ties: higher rate)
