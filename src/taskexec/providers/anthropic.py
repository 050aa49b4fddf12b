"""Anthropic's Messages API."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from .._models import Agent, Usage
from .base import (
    ChatReply,
    HttpProvider,
    StreamDecoder,
    StreamErrorEvent,
    text_or_none,
    tokens,
)

__all__ = ("AnthropicProvider",)


class AnthropicProvider(HttpProvider):
    """``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version`` headers."""

    name: ClassVar[str] = "anthropic"
    key_env_vars: ClassVar[tuple[str, ...]] = ("ANTHROPIC_API_KEY",)
    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    base_url_env_var: ClassVar[str | None] = "ANTHROPIC_BASE_URL"
    default_model: ClassVar[str] = "claude-sonnet-4-5"
    api_version: ClassVar[str] = "2023-06-01"
    #: The Messages API requires max_tokens; this is used when the agent sets none.
    default_max_tokens: ClassVar[int] = 1024

    def endpoint(self, agent: Agent) -> str:
        return f"{self.base_url(agent)}/v1/messages"

    def headers(self, agent: Agent, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": self.api_version}
        if key:
            headers["x-api-key"] = key
        return headers

    def payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": agent.model or self.default_model,
            "max_tokens": agent.max_tokens or self.default_max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        if agent.system_prompt:
            body["system"] = agent.system_prompt
        if agent.temperature is not None:
            body["temperature"] = agent.temperature
        return body

    def stream_decoder(self) -> StreamDecoder:
        return _AnthropicStream()

    def parse(self, data: Any) -> ChatReply:
        blocks = data["content"]
        if not isinstance(blocks, list):
            raise TypeError("content is not a list of blocks")
        text = "".join(b["text"] for b in blocks if b.get("type") == "text")
        usage = data.get("usage") or {}
        # Anthropic's input_tokens counts only the tokens after the last cache breakpoint:
        # cache reads and cache writes are reported apart. Usage.input_tokens is every prompt
        # token on every vendor, so they are added back (and priced at their own rates).
        read = tokens(usage.get("cache_read_input_tokens"))
        write = tokens(usage.get("cache_creation_input_tokens"))
        stop = data.get("stop_reason")
        return ChatReply(
            text,
            Usage(
                input_tokens=tokens(usage.get("input_tokens")) + read + write,
                output_tokens=tokens(usage.get("output_tokens")),
                cache_read_tokens=read,
                cache_write_tokens=write,
            ),
            model=text_or_none(data.get("model")),
            response_id=text_or_none(data.get("id")),
            finish_reasons=(stop,) if isinstance(stop, str) else (),
        )


#: Anthropic's error types by the HTTP status they stand for (for retry decisions).
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class _AnthropicStream(StreamDecoder):
    """``message_start``, ``content_block_*``, ``message_delta`` (usage), ``message_stop``."""

    def event(self, name: str, data: str) -> str | None:
        document = json.loads(data)
        kind = document["type"]
        if kind == "content_block_delta":
            delta = document["delta"]
            if delta.get("type") != "text_delta":
                return None  # tool input, thinking: not the reply's text
            text = delta["text"]
            if not isinstance(text, str):
                raise TypeError("delta.text is not a string")
            return text
        if kind == "message_start":
            usage = document["message"].get("usage") or {}
            self.usage = Usage(
                input_tokens=tokens(usage.get("input_tokens")),
                output_tokens=tokens(usage.get("output_tokens")),
            )
        elif kind == "message_delta":
            usage = document.get("usage") or {}
            # output_tokens here is the running total of the whole message.
            update = {"output_tokens": tokens(usage.get("output_tokens"))}
            if usage.get("input_tokens") is not None:
                update["input_tokens"] = tokens(usage.get("input_tokens"))
            self.usage = self.usage.model_copy(update=update)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            error = document.get("error") or {}
            raise StreamErrorEvent(
                str(error.get("message", "error")), _ERROR_STATUS.get(error.get("type", ""), 500)
            )
        return None
