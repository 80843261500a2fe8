import json

import pytest

from rl.data.problems import DataConfig, DatasetError, LoadReport, load_problems

BENCHES = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "smoke": 20}


@pytest.mark.parametrize("name,count", sorted(BENCHES.items()))
def test_shared_benchmarks_load(shared_dir, name, count):
    probs = load_problems(DataConfig(source=str(shared_dir / "benchmarks" / f"{name}.jsonl")))
    assert len(probs) == count
    assert len({p.id for p in probs}) == count
    assert all(p.problem.strip() and p.answer.strip() for p in probs)


def test_custom_columns_and_limit(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"q": f"what is {i}?", "a": i, "uid": f"u{i}"}) for i in range(5)))
    probs = load_problems(DataConfig(source=str(f), problem_key="q", answer_key="a", id_key="uid", limit=3))
    assert [(p.id, p.answer) for p in probs] == [("u0", "0"), ("u1", "1"), ("u2", "2")]


def test_json_and_hashes(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"question": "q", "answer": "work\n#### 1,234"}]))
    probs = load_problems(DataConfig(source=str(f), problem_key="question", answer_after_hashes=True, id_key=None))
    assert probs[0].answer == "1234" and probs[0].id == "row-1"


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"problem": "p"}', "row 2: missing field 'answer'"),
        ('{"problem": "", "answer": "1"}', "row 2: field 'problem' is empty"),
        ('{"problem": ["p"], "answer": "1"}', "row 2: field 'problem' must be a string, got list"),
        ('{"problem": "p", "answer": ', "row 2: not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DatasetError) as e:
        load_problems(DataConfig(source=str(f)))
    assert str(f) in str(e.value) and msg in str(e.value)


def test_bad_utf8_and_skip_mode(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(
        b'{"problem": "ok", "answer": "1"}\n{"problem": "\xff\xfe", "answer": "2"}\n{"problem": "x", "answer": "3"}\n'
    )
    with pytest.raises(DatasetError, match="row 2: bad UTF-8"):
        load_problems(DataConfig(source=str(f)))
    report = LoadReport()
    probs = load_problems(DataConfig(source=str(f), on_bad_row="skip"), report)
    assert [p.answer for p in probs] == ["1", "3"] and report.skipped == 1 and report.loaded == 2


def test_missing_file_and_suffix(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_problems(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_problem_stream_computes_each_epoch_order_once_in_the_seeded_order():
    """The stream takes the same problems as the per-prompt reshuffle did (epoch e in the order
    ``problem_order(n, seed, e)``), computing each epoch's order once, across epoch boundaries."""
    from rl.trainer.setup import ProblemStream, problem_order

    problems = [f"p{i}" for i in range(10)]
    stream = ProblemStream(problems, seed=3)
    taken = [x for c in range(0, 24, 4) for x in stream.take(c, 4)]  # 2.4 epochs, steps of 4
    want = [problems[problem_order(10, 3, c // 10)[c % 10]] for c in range(24)]
    assert taken == want
    assert sorted(taken[:10]) == sorted(problems) and taken[:10] != taken[10:20]  # each epoch reshuffled
    assert stream.orders_computed == 3  # epochs 0, 1, 2: once each, not once per prompt
    assert ProblemStream(problems, seed=4).take(0, 10) != taken[:10]
