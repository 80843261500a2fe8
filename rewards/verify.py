"""Answer extraction and verification for math responses, on top of Math-Verify.

``verify_answer(response, gold)``:
1. If the response contains ``</think>``, only the text after the last ``</think>`` counts; a
   response that opens ``<think>`` and never closes it has no answer.
2. Math-Verify extracts the answer from that text, ``\\boxed{...}`` first (then "final answer is",
   then the last formula); when it finds nothing, configurable fallback patterns ("The answer is
   ...") pick the answer text.
3. Gold and prediction are parsed by Math-Verify and compared with ``math_verify.verify(gold, pred)``
   (gold first: the comparison is not symmetric). A gold that is a single choice letter (A-J)
   is compared as a letter.

Nothing here calls ``eval``/``exec``/``sympify`` on model text: Math-Verify parses LaTeX through its
own grammar. Math-Verify's timeouts use ``signal.alarm`` and only work in a main thread; the batch
verifier (``rewards.batch``) adds a hard per-item bound with process isolation on top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
MAX_RESPONSE_CHARS = 20_000  # only the tail of a longer answer section is parsed
MAX_ANSWER_CHARS = 1_000  # an extracted answer longer than this is not a math answer
CHOICE_LETTERS = "ABCDEFGHIJ"

DEFAULT_FALLBACKS: tuple[str, ...] = (
    r"[Tt]he (?:final )?answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)",
    r"[Ff]inal [Aa]nswer[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)",
)


@dataclass(frozen=True)
class VerifyConfig:
    """How answers are extracted and compared."""

    fallback_patterns: tuple[str, ...] = field(
        default=DEFAULT_FALLBACKS, metadata={"help": "regexes (group 1 = answer) tried when there is no \\boxed{}"}
    )
    float_rounding: int = field(default=6, metadata={"help": "decimal places floats are rounded to"})
    parse_timeout_s: int = field(default=3, metadata={"help": "Math-Verify's own signal timeout (main thread only)"})


def answer_section(response: str) -> str | None:
    """The text that may hold the answer: after the last ``</think>``; None if thinking never closed."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        i = text.index("{", start) + 1
        depth = 1
        j = i
        while j < len(text) and depth:
            c = text[j]
            if c == "\\" and j + 1 < len(text):
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1].strip()
    return None


def extract_answer(response: str, config: VerifyConfig | None = None) -> str | None:
    """The answer string a response commits to, or None (no answer)."""
    cfg = config or VerifyConfig()
    text = answer_section(response)
    if text is None:
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in cfg.fallback_patterns:
        found = list(re.finditer(pattern, text))
        if found:
            return found[-1].group(1).strip()
    return None


def _clean(s: str) -> str:
    # null bytes and lone surrogates cannot reach the parser
    return s.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_GOLD_LETTER = (
    re.compile(r"answer is\s*\(?([A-J])\)?(?:[\s.:]|$)"),
    re.compile(r"^\s*\(?([A-J])\)?(?:[\s.:]|$)"),
    re.compile(r"\(([A-J])\)"),
)
_LETTER_WRAPPERS = re.compile(r"\\(?:mathrm|textbf|text|mathbf|textrm)\{([^{}]*)\}")


def _has_math_delimiters(s: str) -> bool:
    return bool(_UNESCAPED_DOLLAR.search(s)) or "\\boxed" in s or "\\(" in s or "\\[" in s


def _parse(text: str, cfg: VerifyConfig):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        text[-MAX_RESPONSE_CHARS:],
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=cfg.parse_timeout_s,
    )


def _candidates(text: str, cfg: VerifyConfig) -> list:
    """Parsed readings of ``text``: as written, and as one LaTeX formula when it has no delimiters."""
    out = [_parse(text, cfg)]
    if not _has_math_delimiters(text) and len(text) <= MAX_ANSWER_CHARS:
        out.append(_parse(f"${text}$", cfg))
    return [c for c in out if c]


def gold_choice_letter(gold: str) -> str | None:
    """The choice letter of a multiple-choice gold such as ``C``, ``(D) Alina`` or ``C Cecile``."""
    for pattern in _GOLD_LETTER:
        m = pattern.search(gold)
        if m:
            return m.group(1)
    return None


def pred_choice_letter(response: str, strict: bool = False) -> str | None:
    """The choice letter a response commits to. ``strict``: only a bare letter (boxed or alone)."""
    from math_verify import StringExtractionConfig, parse

    section = answer_section(response)
    if section is None:
        return None
    boxed = last_boxed(section)
    if boxed is not None:
        section = boxed
    section = _LETTER_WRAPPERS.sub(r"\1", section).strip().strip("$").strip()
    bare = section.strip("().:* ")
    if len(bare) == 1 and bare in CHOICE_LETTERS:
        return bare
    if strict:
        return None
    found = parse(
        section[-MAX_RESPONSE_CHARS:],
        extraction_config=[StringExtractionConfig(strings=tuple(CHOICE_LETTERS), lowercase=False)],
    )
    return found[0] if found and isinstance(found[0], str) and found[0] in CHOICE_LETTERS else None


def verify_answer(
    response: str, gold: str, config: VerifyConfig | None = None, multiple_choice: bool | None = None
) -> bool:
    """True when ``response`` commits to an answer equivalent to ``gold``. Never raises.

    ``multiple_choice``: compare choice letters (GPQA-style); None = when the gold is a single letter.
    """
    from math_verify import verify

    cfg = config or VerifyConfig()
    try:
        response, gold = _clean(response), _clean(gold)
        auto_choice = multiple_choice is None
        if auto_choice:
            bare_gold = gold.strip().strip("()")
            multiple_choice = len(bare_gold) == 1 and bare_gold in CHOICE_LETTERS
        if multiple_choice:
            letter = gold_choice_letter(gold)
            return letter is not None and pred_choice_letter(response, strict=auto_choice) == letter
        section = answer_section(response)
        if section is None:
            return False
        preds = _candidates(section, cfg)
        if not preds:
            answer = extract_answer(response, cfg)  # configurable fallback patterns
            preds = _candidates(answer, cfg) if answer and len(answer) <= MAX_ANSWER_CHARS else []
        if not preds:
            return False
        golds = _candidates(gold, cfg)
        return any(
            verify(g, p, float_rounding=cfg.float_rounding, timeout_seconds=cfg.parse_timeout_s)
            for g in golds
            for p in preds
        )
    except Exception:  # noqa: BLE001 - a verdict, never an exception, is the contract
        return False
