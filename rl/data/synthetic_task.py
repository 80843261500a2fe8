"""The embedded synthetic reasoning task: modular arithmetic chains with redundant re-checking.

A problem is a start value and ``k`` numbered operations (``k`` = difficulty, 2..6), all modulo 10::

    Start at 3. Apply in order: 1: +5 2: *2 3: -4. Work modulo 10.

The reference chain of thought computes one numbered step per line, then re-checks the whole
computation a random number of times (the over-thinking S-GRPO removes), then answers::

    <think>
    1: +5, 3+5=8
    2: *2, 8*2=6
    3: -4, 6-4=2
    check 1: +5, 3+5=8 2: *2, 8*2=6 3: -4, 6-4=2 ok
    check 1: +5, 3+5=8 2: *2, 8*2=6 3: -4, 6-4=2 ok
    </think>

    The answer is \\boxed{2}.

The answer is knowable exactly once the ``k`` steps are written; before that, a forced answer is a
guess (right about 1 time in 10). Every generator is a pure function of its seed.

The ``recheck`` variant (``TASKS["recheck"]``, ``exitrl demo --task recheck``) opens the thinking with
a first pass, the answer written in one line before any step::

    <think>
    first pass: 2
    1: +5, 3+5=8
    ...

The model is only ever trained to write the true first pass. It must compose all ``k`` operations
in one forward pass to write it, which a 4-block model cannot do reliably: its first-pass errors are
its own. The step lines then re-check the first pass one operation at a time, which it computes
reliably, and the answer follows the re-check. To learn that (when both agree, as in every correct
trace, the answer could as well be copied from the first pass), part of the full SFT traces show a
wrong first pass (``shown_first_pass``) that the re-check overrules; the wrong value is context only,
never a training target (``untrained_spans`` masks it out of the SFT loss). Forced exits teach
answering the latest value computed: a trace cut after the first pass answers the first pass, one cut
after step j answers step j's value.

Held-out problems are never trained on: the problem space is split by a hash of each problem's
content (``content_split``) into a held-out share, a validation share and the rest, and every stream
draws only from its own share. Distinct seeds alone are not enough: easy problems repeat across
streams (there are 6,760 two-step problems), so a seed-only held-out set shared content with the
SFT, RL and router-label pools.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from rollout.thinking import DEFAULT_EXIT_PROMPT

OPS = ("+", "-", "*")
MODULUS = 10

# Seeds reserved so SFT, RL and held-out problems never come from the same generator stream.
SFT_SEED_OFFSET = 1_000
HELDOUT_SEED = 7
RL_TRAIN_SEED = 2_000
ROUTER_LABEL_SEED = 3_000
VALIDATION_SEED = 8

# Shares of the problem space by content hash (per 100 buckets): held-out problems and the trainer's
# validation problems come only from their own buckets; every training stream (SFT, RL, router
# labels) from the rest.
HELDOUT_BUCKETS = range(0, 10)
VALIDATION_BUCKETS = range(10, 15)
SPLITS = ("train", "validation", "heldout")


def content_split(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    """'heldout', 'validation' or 'train': the share of the problem space this content belongs to
    (a pure function of the problem, whatever stream drew it)."""
    key = f"{start}|" + " ".join(f"{op}{x}" for op, x in ops)
    bucket = int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16) % 100
    if bucket in HELDOUT_BUCKETS:
        return "heldout"
    if bucket in VALIDATION_BUCKETS:
        return "validation"
    return "train"


def apply_op(value: int, op: str, operand: int) -> int:
    if op == "+":
        return (value + operand) % MODULUS
    if op == "-":
        return (value - operand) % MODULUS
    if op == "*":
        return (value * operand) % MODULUS
    raise ValueError(f"unknown op {op!r}")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: ``start`` then ``ops[i] = (op, operand)`` applied in order, modulo 10."""

    id: str
    start: int
    ops: tuple[tuple[str, int], ...]
    rechecks: int = 0  # how many redundant re-checks the reference trace does
    first_pass: bool = False  # the recheck variant: a one-line first pass opens the thinking
    shown_first_pass: int | None = None  # SFT context only: a wrong first pass the re-check overrules

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    @property
    def problem(self) -> str:
        steps = " ".join(f"{i + 1}: {op}{x}" for i, (op, x) in enumerate(self.ops))
        return f"Start at {self.start}. Apply in order: {steps}. Work modulo 10."

    def values(self) -> list[int]:
        """Running values after each step (len == difficulty)."""
        out, v = [], self.start
        for op, x in self.ops:
            v = apply_op(v, op, x)
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    def step_lines(self) -> list[str]:
        lines, v = [], self.start
        for i, (op, x) in enumerate(self.ops):
            nv = apply_op(v, op, x)
            lines.append(f"{i + 1}: {op}{x}, {v}{op}{x}={nv}")
            v = nv
        return lines

    def check_line(self) -> str:
        return "check " + " ".join(self.step_lines()) + " ok"

    def first_pass_line(self) -> str:
        shown = self.answer if self.shown_first_pass is None else self.shown_first_pass
        return f"first pass: {shown}"

    def computed_lines(self) -> list[tuple[str, int]]:
        """(line, the value it computes) for every computing line, in order: the first pass (recheck
        variant), then the steps."""
        steps = list(zip(self.step_lines(), self.values()))
        shown = int(self.answer) if self.shown_first_pass is None else self.shown_first_pass
        return ([(self.first_pass_line(), shown)] if self.first_pass else []) + steps

    def thinking(self) -> str:
        """The reference thinking text (between <think> and </think>)."""
        lines = [line for line, _ in self.computed_lines()] + [self.check_line()] * self.rechecks
        return "\n" + "\n".join(lines) + "\n"

    def computation_chars(self) -> int:
        """Length of the thinking text up to the end of the last computation step."""
        return len("\n" + "\n".join(line for line, _ in self.computed_lines()) + "\n")

    def completion(self) -> str:
        """The reference assistant turn (thinking then answer), without the end-of-turn token."""
        return f"<think>{self.thinking()}</think>\n\nThe answer is \\boxed{{{self.answer}}}."

    def to_record(self) -> dict:
        return {"id": self.id, "problem": self.problem, "answer": self.answer, "difficulty": self.difficulty}


@dataclass
class TaskConfig:
    """Generator settings for the synthetic task."""

    min_ops: int = field(default=2, metadata={"help": "fewest operations (easiest problems)"})
    max_ops: int = field(default=6, metadata={"help": "most operations (hardest problems)"})
    recheck_weights: tuple[float, ...] = field(
        default=(0.1, 0.3, 0.3, 0.3),
        metadata={"help": "probability of 0, 1, 2, 3 ... redundant re-checks in a reference trace"},
    )
    first_pass: bool = field(
        default=False, metadata={"help": "the recheck variant: traces open with a one-line first pass (the answer)"}
    )


# the task variants (``exitrl demo --task``): every problem is the same, only the reference traces differ
TASKS = {"redundant": TaskConfig(), "recheck": TaskConfig(first_pass=True)}


def generate_problems(
    n: int, seed: int, config: TaskConfig | None = None, prefix: str = "arith", split: str = "train"
) -> list[ArithmeticProblem]:
    """``n`` problems of the ``split`` share of the problem space (``content_split``), difficulty
    uniform in [min_ops, max_ops]; a pure function of ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = config or TaskConfig()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        k = rng.randint(cfg.min_ops, cfg.max_ops)
        start = rng.randrange(MODULUS)
        ops = []
        for _ in range(k):
            op = rng.choice(OPS)
            # multiplying by 0 or 1 makes later steps trivial; keep operands informative
            operand = rng.randrange(2, MODULUS) if op == "*" else rng.randrange(1, MODULUS)
            ops.append((op, operand))
        rechecks = rng.choices(range(len(cfg.recheck_weights)), weights=cfg.recheck_weights)[0]
        if content_split(start, tuple(ops)) != split:
            continue
        pid = f"{prefix}-{seed}-{len(out):05d}"
        out.append(ArithmeticProblem(id=pid, start=start, ops=tuple(ops), rechecks=rechecks, first_pass=cfg.first_pass))
    return out


def forced_exit_completion(problem: ArithmeticProblem, cut_chars: int) -> str:
    """A trace whose thinking is cut after ``cut_chars`` characters and closed by the exit prompt.

    The answer is the last value the thinking had computed (the true answer once all steps are
    written, else a stale intermediate value or the start): what a model that is forced to stop
    can know at that point. Used to teach the tiny model to answer when forced, as real reasoning
    models can.
    """
    think = problem.thinking()[:cut_chars]
    known = problem.start
    for line, v in problem.computed_lines():  # the latest value computed wins
        if ("\n" + line + "\n") in think or think.endswith("\n" + line):
            known = v
    return f"<think>{think}{DEFAULT_EXIT_PROMPT}The answer is \\boxed{{{known}}}."


FIRST_PASS_PREFIX = "<think>\nfirst pass: "


def untrained_spans(completion: str) -> list[tuple[int, int]]:
    """Character spans of an SFT completion left out of the loss: a shown first pass that differs
    from the boxed answer (the recheck variant's wrong first passes are context, never targets)."""
    if not completion.startswith(FIRST_PASS_PREFIX):
        return []
    value = completion[len(FIRST_PASS_PREFIX) : completion.index("\n", len(FIRST_PASS_PREFIX))]
    boxed = completion.rsplit("\\boxed{", 1)[-1].split("}", 1)[0]
    if value == boxed:
        return []
    return [(len(FIRST_PASS_PREFIX), len(FIRST_PASS_PREFIX) + len(value))]


def heldout_problems(n: int, seed: int = HELDOUT_SEED, config: TaskConfig | None = None) -> list[ArithmeticProblem]:
    """Held-out evaluation problems: the held-out share of the problem space, which no training,
    label or validation stream draws from."""
    return generate_problems(n, seed=seed, config=config, prefix="heldout", split="heldout")


def validation_problems(n: int) -> list[ArithmeticProblem]:
    """The trainer's validation problems (``run.eval_data``, split 'validation'): a share of their
    own, disjoint from training and from the held-out set the results are reported on."""
    return generate_problems(n, seed=VALIDATION_SEED, prefix="validation", split="validation")


def rl_train_problems(n: int) -> list[ArithmeticProblem]:
    """The RL problem stream (the training share; seeded apart from SFT)."""
    return generate_problems(n, seed=RL_TRAIN_SEED, prefix="rl")


def router_label_problems(n: int) -> list[ArithmeticProblem]:
    """The problems router labels are searched on (a stream of their own)."""
    return generate_problems(n, seed=ROUTER_LABEL_SEED, prefix="routers")
