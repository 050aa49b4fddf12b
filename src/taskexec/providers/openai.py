"""OpenAI-compatible chat completions: OpenAI, vLLM, Ollama, llama.cpp server, LM Studio."""

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

__all__ = ("OpenAIProvider",)


class OpenAIProvider(HttpProvider):
    """``POST {base_url}/chat/completions`` with a bearer key when one is set."""

    name: ClassVar[str] = "openai"
    key_env_vars: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    base_url_env_var: ClassVar[str | None] = "OPENAI_BASE_URL"
    default_model: ClassVar[str] = "gpt-4o-mini"

    def endpoint(self, agent: Agent) -> str:
        return f"{self.base_url(agent)}/chat/completions"

    def headers(self, agent: Agent, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        messages = []
        if agent.system_prompt:
            messages.append({"role": "system", "content": agent.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": agent.model or self.default_model, "messages": messages}
        if agent.max_tokens is not None:
            body["max_tokens"] = agent.max_tokens
        if agent.temperature is not None:
            body["temperature"] = agent.temperature
        return body

    def stream_payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        # include_usage: one more chunk before [DONE] carries the usage of the whole request.
        body = super().stream_payload(agent, prompt)
        body["stream_options"] = {"include_usage": True}
        return body

    def stream_decoder(self) -> StreamDecoder:
        return _OpenAIStream()

    def parse(self, data: Any) -> ChatReply:
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("choices[0].message.content is not a string")
        usage = data.get("usage") or {}
        # prompt_tokens includes the cached ones (prompt_tokens_details.cached_tokens); OpenAI
        # charges nothing extra to write its automatic cache.
        details = usage.get("prompt_tokens_details") or {}
        return ChatReply(
            content,
            Usage(
                input_tokens=tokens(usage.get("prompt_tokens")),
                output_tokens=tokens(usage.get("completion_tokens")),
                cache_read_tokens=tokens(details.get("cached_tokens")),
            ),
            model=text_or_none(data.get("model")),
            response_id=text_or_none(data.get("id")),
            finish_reasons=tuple(
                str(c["finish_reason"]) for c in data["choices"] if c.get("finish_reason")
            ),
        )


class _OpenAIStream(StreamDecoder):
    """``chat.completion.chunk`` events, a last chunk with the usage, then ``data: [DONE]``."""

    def event(self, name: str, data: str) -> str | None:
        if data == "[DONE]":
            self.done = True
            return None
        chunk = json.loads(data)
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise StreamErrorEvent(str(message))
        usage = chunk.get("usage")
        if usage:
            self.usage = Usage(
                input_tokens=tokens(usage.get("prompt_tokens")),
                output_tokens=tokens(usage.get("completion_tokens")),
            )
        choices = chunk["choices"]
        if not choices:
            return None
        content = choices[0]["delta"].get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError("choices[0].delta.content is not a string")
        return content
