"""Chat prompts for math problems: the instruction and the templated prompt text."""

from __future__ import annotations

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(
    tokenizer,
    problem_text: str,
    instruction: str = INSTRUCTION,
    system_prompt: str | None = None,
    chat_template: bool = True,
    template_kwargs: dict | None = None,
) -> str:
    """The prompt text, ending where the assistant starts: the problem and the instruction in a user
    turn of the chat template (after a system turn when given; ``template_kwargs`` such as
    ``enable_thinking`` go to the template), or the plain text when ``chat_template`` is off."""
    content = f"{problem_text}\n{instruction}" if instruction else problem_text
    if not chat_template:
        return f"{system_prompt}\n\n{content}\n" if system_prompt else f"{content}\n"
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = [*system, {"role": "user", "content": content}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
