"""The OpenAI request bodies arx serve accepts, and the response objects and stream chunks it sends.

Unknown fields are refused (400) rather than ignored: a client that sends `logit_bias` or
`response_format` would otherwise get output that silently ignores what it asked for.
Extensions, as vLLM names them: `top_k`, `repetition_penalty`, `ignore_eos`; every choice
carries its `token_ids` (the only output of a bundle without a tokenizer).
"""

from __future__ import annotations

import time
import uuid
from itertools import accumulate
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from arx.errors import ArxError
from arx.runtime.sampler import SamplingOptions

MAX_N = 16  # choices per prompt: each is a request of its own in the scheduler


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Params(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=1 << 62)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0  # not implemented: only the default (validator below)
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _only_zero(cls, value: float) -> float:
        if value != 0:
            raise ValueError("only 0 is supported; use repetition_penalty (> 1 penalises "
                             "tokens already in the text)")
        return value

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ArxError("stop takes at most 4 strings")
        return tuple(s for s in stops if s)

    def sampling(self, defaults, index: int) -> SamplingOptions:
        """Choice `index`'s sampling: temperature 0 is greedy; what the request leaves out comes
        from the bundle's generation defaults; a seed gives choice i the seed + i."""
        do_sample = defaults.do_sample if self.temperature is None else self.temperature > 0
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return SamplingOptions(
            do_sample=do_sample, temperature=self.temperature or defaults.temperature,
            top_k=pick(self.top_k, defaults.top_k), top_p=pick(self.top_p, defaults.top_p),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            seed=None if self.seed is None else self.seed + index)


class CompletionRequest(Params):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)  # the drawn token's and the k most likely
    echo: Literal[False] = False

    def logprob_count(self) -> int | None:
        return self.logprobs


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls, names: handed to the template
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ArxError("message content parts other than text are not supported by a "
                               "text bundle")
            content = "".join(str(part.get("text", "")) for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ArxError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """The objects of one response: completion or chat, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, tokens: list[int], reason: str | None,
               chunk: bool, role: bool = False, logprobs: dict | None = None) -> dict:
        c: dict[str, Any] = {"index": index, "finish_reason": reason, "token_ids": tokens}
        if not self.chat:
            return {**c, "text": text, "logprobs": logprobs}
        body = {"role": "assistant", "content": text} if role or not chunk else \
            ({"content": text} if text or not reason else {})
        return {**c, "delta" if chunk else "message": body, "logprobs": logprobs}

    def logprobs(self, entries: list[tuple[str, float, list[tuple[str, float]]]],
                 offset: int = 0) -> dict | None:
        """A choice's logprobs object from (token text, logprob, [(text, logprob)] most likely
        first) per token, as OpenAI shapes it: chat's `content` list, or the completion's
        parallel lists (`text_offset` counted from `offset`, the text before these tokens)."""
        if not entries:
            return None
        if self.chat:
            item = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
            return {"content": [{**item(t, lp), "top_logprobs": [item(*a) for a in top]}
                                for t, lp, top in entries], "refusal": None}
        starts = accumulate((len(t) for t, _, _ in entries[:-1]), initial=offset)
        return {"tokens": [t for t, _, _ in entries],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries],
                "text_offset": list(starts)}

    def whole(self, choices: list[dict], use: dict) -> dict:
        return {**self._head(False), "choices": choices, "usage": use}

    def chunk(self, choices: list[dict], use: dict | None = None) -> dict:
        out = {**self._head(True), "choices": choices}
        if use is not None:
            out["usage"] = use
        return out
