"""Every bad input tried on `exitrl train` and `exitrl eval`: one line on stderr naming the bad thing,
exit code 2, no traceback, and (train) nothing loaded or written before the check.

BAD_INPUTS is the table: (id, argv with {tmp}/{data}/{recipe} placeholders, files to create first,
the expected message as a regex)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "tiny_sgrpo.yaml")
RECORD = {"benchmark": "smoke", "id": "smoke-1", "sample": 0, "response": "\\boxed{1}"}

TRAIN = ["train", "{recipe}", "run.out_dir={tmp}/run"]
EVAL = ["eval", "--benchmarks", "smoke", "--data-dir", "{data}"]
REPORT = {"benchmarks": {"smoke": {"accuracy": 1.0}}}

BAD_INPUTS = [
    # ---- exitrl train: the recipe and its overrides
    ("train-missing-recipe", ["train", "{tmp}/nope.yaml"], {}, r"recipe file not found: .*nope\.yaml"),
    ("train-unknown-key", [*TRAIN, "optim.lrr=1e-4"], {}, r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
    (
        "train-unknown-key-in-file",
        ["train", "{tmp}/r.yaml"],
        {"r.yaml": "optim:\n  lrr: 1.0\n"},
        r"r\.yaml: unknown config key 'optim.lrr'",
    ),
    ("train-bad-type", [*TRAIN, "optim.lr=abc"], {}, r"tiny_sgrpo\.yaml: optim.lr: expected float, got str 'abc'"),
    ("train-nan-lr", [*TRAIN, "optim.lr=nan"], {}, r"optim.lr: must be a finite number > 0, got nan"),
    ("train-zero-exits", [*TRAIN, "rollout.serial.num_exits=0"], {}, r"rollout.serial.num_exits: must be > 0, got 0"),
    ("train-negative-epochs", [*TRAIN, "optim.epochs=-1"], {}, r"optim.epochs: must be > 0, got -1"),
    ("train-zero-mini-batches", [*TRAIN, "optim.mini_batches=0"], {}, r"optim.mini_batches: must be > 0, got 0"),
    ("train-zero-steps", [*TRAIN, "run.steps=0"], {}, r"run.steps: must be > 0, got 0"),
    ("train-zero-max-tokens", [*TRAIN, "rollout.max_tokens=0"], {}, r"rollout.max_tokens: must be > 0, got 0"),
    (
        "train-window-order",
        [*TRAIN, "rollout.serial.window=[0.9,0.1]"],
        {},
        r"rollout.serial.window: must satisfy 0 <= low < high <= 1, got \[0.9, 0.1\]",
    ),
    (
        "train-window-length",
        [*TRAIN, "rollout.serial.window=[0.1,0.5,0.9]"],
        {},
        r"rollout.serial.window: must be two fractions",
    ),
    ("train-betas-length", [*TRAIN, "optim.betas=[0.9]"], {}, r"optim.betas: must be two numbers"),
    ("train-negative-temperature", [*TRAIN, "rollout.temperature=-0.5"], {}, r"rollout.temperature: must be >= 0"),
    ("train-clip-low", [*TRAIN, "loss.clip_low=1.5"], {}, r"loss.clip_low: must be in \(0, 1\), got 1.5"),
    ("train-unknown-reward", [*TRAIN, "loss.reward=magic"], {}, r"loss.reward: unknown reward 'magic'"),
    (
        "train-reward-plugin-missing",
        [*TRAIN, "loss.reward=no_such_pkg.rewards:fn"],
        {},
        r"loss.reward: reward 'no_such_pkg.rewards:fn': cannot import module 'no_such_pkg.rewards'",
    ),
    ("train-missing-data", [*TRAIN, "data.source={tmp}/none.jsonl"], {}, r"dataset file not found: .*none\.jsonl"),
    (
        "train-bad-data-row",
        [*TRAIN, "data.source={tmp}/d.jsonl"],
        {"d.jsonl": '{"problem": "1+1", "answer": "2"}\n[3]\n'},
        r"d\.jsonl: row 2: expected an object, got list",
    ),
    (
        "train-recipe-changed-on-resume",
        [*TRAIN, "optim.lr=3e-4"],
        {"run/config.json": "CONFIG", "run/checkpoints/step-000001/meta.json": "{}"},
        r"config\.json: the recipe differs from the run being resumed in optim.lr; use another run.out_dir",
    ),
    # ---- exitrl eval
    (
        "eval-line-not-object",
        [*EVAL, "--responses", "{tmp}/r.jsonl"],
        {"r.jsonl": "[1, 2]\n"},
        r"r\.jsonl: line 1: expected a JSON object, got list",
    ),
    (
        "eval-null-response",
        [*EVAL, "--responses", "{tmp}/r.jsonl"],
        {"r.jsonl": json.dumps({**RECORD, "response": None}) + "\n"},
        r"r\.jsonl: line 1: field 'response' must be a string, got null",
    ),
    (
        "eval-missing-field",
        [*EVAL, "--responses", "{tmp}/r.jsonl"],
        {"r.jsonl": '{"id": "smoke-1", "sample": 0}\n'},
        r"r\.jsonl: line 1: missing field 'response'",
    ),
    (
        "eval-cut-last-line-rescoring",
        [*EVAL, "--responses", "{tmp}/r.jsonl"],
        {"r.jsonl": json.dumps(RECORD) + '\n{"id": "smo'},
        r"r\.jsonl: line 2 is not valid JSON",
    ),
    (
        "eval-missing-responses",
        [*EVAL, "--responses", "{tmp}/gone.jsonl"],
        {},
        r"--responses .*gone\.jsonl: file not found",
    ),
    ("eval-n-zero", [*EVAL, "--model", "tiny", "--strategy", "sample", "--n", "0"], {}, r"--n must be >= 1, got 0"),
    ("eval-limit-zero", [*EVAL, "--model", "tiny", "--limit", "0"], {}, r"--limit must be > 0, got 0"),
    ("eval-limit-negative", [*EVAL, "--model", "tiny", "--limit", "-3"], {}, r"--limit must be > 0, got -3"),
    ("eval-max-tokens-zero", [*EVAL, "--model", "tiny", "--max-tokens", "0"], {}, r"--max-tokens must be > 0, got 0"),
    (
        "eval-negative-temperature",
        [*EVAL, "--model", "tiny", "--strategy", "sample", "--n", "2", "--temperature", "-1"],
        {},
        r"--temperature must be >= 0, got -1",
    ),
    (
        "eval-ffs-greedy",
        [*EVAL, "--model", "tiny", "--strategy", "ffs", "--n", "4", "--temperature", "0"],
        {},
        r"--strategy ffs samples: --temperature must be > 0",
    ),
    (
        "eval-baseline-missing",
        [*EVAL, "--responses", "{tmp}/r.jsonl", "--baseline", "{tmp}/base.json"],
        {"r.jsonl": json.dumps(RECORD) + "\n"},
        r"--baseline .*base\.json: file not found",
    ),
    (
        "eval-baseline-not-report",
        [*EVAL, "--responses", "{tmp}/r.jsonl", "--baseline", "{tmp}/base.json"],
        {"r.jsonl": json.dumps(RECORD) + "\n", "base.json": "[1, 2]"},
        r"--baseline .*base\.json: not a report of exitrl eval",
    ),
    (
        "eval-model-missing",
        [*EVAL, "--model", "{tmp}/no_model", "--backend", "hf"],
        {},
        r"--model .*no_model: no such folder",
    ),
    (
        "eval-model-not-a-model",
        [*EVAL, "--model", "{tmp}/empty/", "--backend", "hf"],
        {"empty/x.txt": ""},
        r"--model .*empty/: not a model folder \(no config.json\)",
    ),
    (
        "eval-compare-not-report",
        ["eval", "compare", "{tmp}/a.json"],
        {"a.json": '{"x": 1}'},
        r"a\.json: not a report of exitrl eval",
    ),
]


def _fill(item: str, tmp: Path, data: Path) -> str:
    return item.replace("{tmp}", str(tmp)).replace("{data}", str(data)).replace("{recipe}", RECIPE)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_clear_line_and_exit_2(case, tmp_path, shared_dir, capsys, monkeypatch):
    from rl.cli import main
    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config, to_dict

    name, argv, files, message = case
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text == "CONFIG":  # the config.json of an earlier run of the same recipe
            text = json.dumps(to_dict(load_config(TrainConfig, RECIPE, [f"run.out_dir={tmp_path}/run"])))
        path.write_text(text)
    loaded = []
    monkeypatch.setattr(
        "rl.trainer.loop.build_trainer", lambda *a, **k: loaded.append(a) or pytest.fail("model loaded")
    )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main([_fill(a, tmp_path, shared_dir / "benchmarks") for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not loaded
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_resume_goes_on_when_told(tmp_path):
    """run.allow_recipe_change=true lets a changed recipe resume; the earlier config.json is kept."""
    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config, to_dict
    from rl.trainer.loop import check_recipe_unchanged, recipe_changes, write_config

    old = load_config(TrainConfig, RECIPE, [f"run.out_dir={tmp_path}"])
    write_config(tmp_path, old, 0)
    new = load_config(
        TrainConfig,
        RECIPE,
        [f"run.out_dir={tmp_path}", "optim.lr=3e-4", "run.steps=90", "run.allow_recipe_change=true"],
    )
    assert recipe_changes(to_dict(old), to_dict(new)) == ["optim.lr"]  # run.steps may change freely
    check_recipe_unchanged(tmp_path, new)  # no error
    write_config(tmp_path, new, 12)
    assert json.loads((tmp_path / "config.step-12.json").read_text())["optim"]["lr"] == old.optim.lr
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 3e-4


def test_train_help_lists_every_recipe_field(capsys):
    from rl.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "rollout.serial.num_exits (int, default 4): m: early exits per full rollout" in out
    assert "loss.reward (str | None, default None):" in out and "package.module:function" in out
