"""Problems with gold answers: loading (hub id or local .jsonl/.json/.parquet) and chat prompts.

A malformed row (missing or empty field, wrong type, bad UTF-8, bad JSON) raises a
``DatasetError`` naming the file and row, or is skipped and counted when ``on_bad_row="skip"``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rl.data.prompts import INSTRUCTION, build_prompt

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetError(ValueError):
    """A dataset source or row that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DataConfig:
    """Where problems come from and how their prompts are built."""

    source: str = field(
        default="synthetic", metadata={"help": "'synthetic', a local .jsonl/.json/.parquet path, or a hub dataset id"}
    )
    subset: str | None = field(
        default=None, metadata={"help": "hub dataset config name (e.g. 'main' for openai/gsm8k)"}
    )
    split: str = field(
        default="train",
        metadata={"help": "hub dataset split ('synthetic': train, validation or test, disjoint by content)"},
    )
    problem_key: str = field(default="problem", metadata={"help": "column holding the problem text"})
    answer_key: str | None = field(
        default="answer",
        metadata={"help": "column holding the gold answer (null: the data has none; router labels need none)"},
    )
    id_key: str | None = field(default="id", metadata={"help": "column holding a stable id (row number when absent)"})
    on_bad_row: Literal["error", "skip"] = field(
        default="error", metadata={"help": "'error' stops with file and row; 'skip' drops and counts"}
    )
    limit: int | None = field(default=None, metadata={"help": "keep the first N problems"})
    chat_template: bool = field(default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template"})
    system_prompt: str | None = field(default=None, metadata={"help": "a system turn before the problem"})
    template_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "extra chat-template arguments, e.g. {enable_thinking: true} for Qwen3"},
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "drop (and count) problems whose prompt is longer than this"}
    )
    instruction: str = field(default=INSTRUCTION, metadata={"help": "appended to each problem in the user turn"})
    choice_keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "multiple choice: columns of the options, the correct one first (GPQA: 'Correct Answer', "
            "'Incorrect Answer 1..3'); the prompt lists them shuffled per item as A, B, C, ... "
            "and the gold is the letter"
        },
    )
    answer_after_hashes: bool = field(default=False, metadata={"help": "gold is the text after '####' (raw GSM8K)"})


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)


def _iter_local_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(1-based row number, row) for each record; bad JSON / UTF-8 rows are yielded as exceptions."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield n, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield n, DatasetError(f"{path}: row {n}: bad UTF-8 ({e.reason} at byte {e.start})")
                except json.JSONDecodeError as e:
                    yield n, DatasetError(f"{path}: row {n}: not valid JSON ({e.msg})")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: cannot read JSON: {e}") from None
        if isinstance(data, dict):  # {"data": [...]} style
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DatasetError(f"{path}: expected a list of records (or a mapping holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of records, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    elif path.suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        yield from enumerate(ds, start=1)
    else:
        raise DatasetError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")


def _iter_hub_rows(cfg: DataConfig) -> Iterable[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DatasetError(
            f"cannot load hub dataset {cfg.source!r} (subset={cfg.subset}, split={cfg.split}): {e}"
        ) from e
    yield from enumerate(ds, start=1)


def _row_to_problem(row: Any, n: int, where: str, cfg: DataConfig) -> Problem:
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: row {n}: expected an object, got {type(row).__name__}")
    values = {}
    keys = (cfg.problem_key, *(cfg.choice_keys or ([cfg.answer_key] if cfg.answer_key else [])))
    for key in keys:
        if key not in row or row[key] is None:
            raise DatasetError(f"{where}: row {n}: missing field '{key}'")
        v = row[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and key != cfg.problem_key:
            v = str(v)
        if not isinstance(v, str):
            raise DatasetError(f"{where}: row {n}: field '{key}' must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DatasetError(f"{where}: row {n}: field '{key}' is empty")
        values[key] = v
    pid = row.get(cfg.id_key) if cfg.id_key else None
    pid = str(pid) if pid is not None else f"row-{n}"
    meta = {k: v for k, v in row.items() if k not in keys and isinstance(v, (str, int, float))}
    if cfg.choice_keys:
        text, letter = multiple_choice(values[cfg.problem_key], [values[k] for k in cfg.choice_keys], pid)
        return Problem(id=pid, problem=text, answer=letter, meta={**meta, "choices": len(cfg.choice_keys)})
    if not cfg.answer_key:
        return Problem(id=pid, problem=values[cfg.problem_key], answer="", meta=meta)
    answer = values[cfg.answer_key]
    if cfg.answer_after_hashes:
        if "####" not in answer:
            raise DatasetError(f"{where}: row {n}: field '{cfg.answer_key}' has no '####' final answer")
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return Problem(id=pid, problem=values[cfg.problem_key], answer=answer.strip(), meta=meta)


def multiple_choice(question: str, options: list[str], item_id: str) -> tuple[str, str]:
    """(prompt text listing ``options`` as A), B), ... in an order fixed by ``item_id``, letter of
    ``options[0]``, the correct one)."""
    order = list(range(len(options)))
    random.Random(int(hashlib.sha256(item_id.encode()).hexdigest()[:16], 16)).shuffle(order)
    letters = "ABCDEFGHIJ"[: len(options)]
    lines = [f"{letters[i]}) {options[j].strip()}" for i, j in enumerate(order)]
    text = (
        f"{question.strip()}\n\n"
        + "\n".join(lines)
        + f"\n\nAnswer with the letter ({letters[0]}-{letters[-1]}) of the correct option."
    )
    return text, letters[order.index(0)]


def load_problems(cfg: DataConfig, report: LoadReport | None = None) -> list[Problem]:
    """Problems from ``cfg.source``: 'synthetic', a local file, or a hub dataset id."""
    report = report if report is not None else LoadReport()
    if cfg.source == "synthetic":
        # 'train': the RL stream; 'validation': the trainer's checks; 'test': the held-out set. The
        # three draw from disjoint shares of the problem space (rl.data.synthetic_task.content_split)
        from rl.data.synthetic_task import heldout_problems, rl_train_problems, validation_problems

        if cfg.split == "train":
            probs = rl_train_problems(cfg.limit or 20000)
        elif cfg.split == "validation":
            probs = validation_problems(cfg.limit or 200)
        elif cfg.split == "test":
            probs = heldout_problems(cfg.limit or 200)
        else:
            raise DatasetError(f"synthetic: unknown split {cfg.split!r} (train, validation or test)")
        report.loaded = len(probs)
        return [Problem(p.id, p.problem, p.answer, {"difficulty": p.difficulty}) for p in probs]
    path = Path(cfg.source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise DatasetError(f"dataset file not found: {path}")
        rows, where = _iter_local_rows(path), str(path)
    else:
        rows, where = _iter_hub_rows(cfg), cfg.source
    out: list[Problem] = []
    for n, row in rows:
        try:
            out.append(_row_to_problem(row, n, where, cfg))
        except DatasetError as e:
            if cfg.on_bad_row == "error":
                raise
            report.skipped += 1
            report.skipped_rows.append(str(e))
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
    report.loaded = len(out)
    if not out:
        raise DatasetError(f"{where}: no usable rows ({report.skipped} skipped)")
    return out


def prompt_text(tokenizer, problem: Problem, cfg: DataConfig) -> str:
    """The prompt for ``problem`` as the recipe builds it (template, system turn, instruction)."""
    return build_prompt(
        tokenizer,
        problem.problem,
        cfg.instruction,
        system_prompt=cfg.system_prompt,
        chat_template=cfg.chat_template,
        template_kwargs=cfg.template_kwargs,
    )


def encode_prompts(tokenizer, problems: list[Problem], cfg: DataConfig) -> list[list[int]]:
    texts = [prompt_text(tokenizer, p, cfg) for p in problems]
    return tokenizer(texts, add_special_tokens=not cfg.chat_template)["input_ids"] if texts else []


def drop_overlong(tokenizer, problems: list[Problem], cfg: DataConfig) -> tuple[list[Problem], int]:
    """(problems whose prompt fits ``cfg.max_prompt_tokens``, how many were dropped)."""
    if cfg.max_prompt_tokens is None:
        return problems, 0
    kept = [
        p for p, ids in zip(problems, encode_prompts(tokenizer, problems, cfg)) if len(ids) <= cfg.max_prompt_tokens
    ]
    if not kept:
        raise DatasetError(f"{cfg.source}: every prompt is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}")
    return kept, len(problems) - len(kept)
