"""Chat prompts for math problems: the instruction and the templated prompt text."""

from __future__ import annotations

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(tokenizer, problem_text: str, instruction: str = INSTRUCTION) -> str:
    """The chat-templated prompt text, ending where the assistant starts."""
    content = f"{problem_text}\n{instruction}" if instruction else problem_text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
