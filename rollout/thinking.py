"""Where thinking is in a completion, and how many tokens it has: one definition for training
metrics, evaluation, the demo and serial-group exits.

Thinking is the tokens strictly between ``<think>`` and ``</think>``; neither tag counts. When the
completion does not start with ``<think>`` (templates such as R1-Distill's open it in the prompt)
thinking starts at the first completion token. When ``</think>`` never comes (cut at the length
limit) thinking runs to the completion's end and is *unclosed*.
"""

from __future__ import annotations

# The exit prompt serial groups, forced exits and FFS budgets insert to close the thinking.
DEFAULT_EXIT_PROMPT = "Time is limited, stop thinking and start answering.\n</think>\n\n"


def thinking_span(completion_ids: list[int], think_open_id: int | None, think_close_id: int) -> tuple[int, int, bool]:
    """(start, end, closed): thinking is ``completion_ids[start:end]``.

    ``start`` is just after ``<think>`` when the completion opens it (Qwen3), else 0. ``end`` is the
    index of ``</think>``, or the completion's end when the thinking never closed.
    """
    start = 0
    if think_open_id is not None and completion_ids[:1] == [think_open_id]:
        start = 1
    try:
        return start, completion_ids.index(think_close_id, start), True
    except ValueError:
        return start, len(completion_ids), False


def thinking_tokens(completion_ids: list[int], think_open_id: int | None, think_close_id: int) -> int:
    """The number of thinking tokens (tags excluded; all the rest when thinking never closed)."""
    start, end, _ = thinking_span(completion_ids, think_open_id, think_close_id)
    return end - start


def think_tag_ids(tokenizer) -> tuple[int | None, int]:
    """(``<think>`` id or None, ``</think>`` id) of a tokenizer."""
    close_id = tokenizer.convert_tokens_to_ids("</think>")
    if close_id is None or close_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no '</think>' token: exitrl needs a reasoning model's tokenizer")
    open_id = tokenizer.convert_tokens_to_ids("<think>")
    return (None if open_id == tokenizer.unk_token_id else open_id), close_id


def prompt_opens_thinking(prompt_ids: list[int], think_open_id: int | None, think_close_id: int) -> bool:
    """True when the prompt itself opened ``<think>`` (R1-style templates): its last ``<think>``
    comes after its last ``</think>``. The completion then starts inside the thinking."""
    if think_open_id is None or think_open_id not in prompt_ids:
        return False
    last_open = len(prompt_ids) - 1 - prompt_ids[::-1].index(think_open_id)
    last_close = len(prompt_ids) - 1 - prompt_ids[::-1].index(think_close_id) if think_close_id in prompt_ids else -1
    return last_open > last_close


def scored_text(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The completion's text as the verifier must read it: prefixed with ``<think>`` when the
    prompt opened the thinking, so a completion cut off before ``</think>`` has no answer (instead of
    its whole thinking being read as one)."""
    open_id, close_id = think_tag_ids(tokenizer)
    text = tokenizer.decode(completion_ids, skip_special_tokens=False)
    if prompt_opens_thinking(prompt_ids, open_id, close_id) and completion_ids[:1] != [open_id]:
        return "<think>" + text
    return text


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the vocabulary's tokens whose text ends with a newline: the line breaks of a thought
    (one pass over the vocabulary; callers keep the result)."""
    return frozenset(i for i in tokenizer.get_vocab().values() if tokenizer.decode([i]).endswith("\n"))


def encode_in_context(tokenizer, text: str, probe: str = "The") -> list[int]:
    """Token ids of ``text`` as they appear when more text follows it.

    BPE tokenizers can merge a trailing run differently at the end of a string than before a word
    (``"\n\n"`` alone is one token, ``"\n\nThe"`` may be ``"\n", "\n", "The"``); the model saw the
    latter in training, so the exit prompt is encoded followed by a probe word, which is dropped.
    """
    ids = tokenizer(text + probe, add_special_tokens=False)["input_ids"]
    for k in range(len(ids), 0, -1):
        if tokenizer.decode(ids[:k]) == text:
            return ids[:k]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
