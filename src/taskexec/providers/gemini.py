"""Google Gemini's ``generateContent``."""

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

__all__ = ("GeminiProvider",)


class GeminiProvider(HttpProvider):
    """``POST {base_url}/v1beta/models/{model}:generateContent`` with ``x-goog-api-key``."""

    name: ClassVar[str] = "gemini"
    # The order Google's own SDK reads them in.
    key_env_vars: ClassVar[tuple[str, ...]] = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
    default_base_url: ClassVar[str] = "https://generativelanguage.googleapis.com"
    base_url_env_var: ClassVar[str | None] = "GEMINI_BASE_URL"
    default_model: ClassVar[str] = "gemini-2.5-flash"

    def endpoint(self, agent: Agent) -> str:
        model = agent.model or self.default_model
        return f"{self.base_url(agent)}/v1beta/models/{model}:generateContent"

    def stream_endpoint(self, agent: Agent) -> str:
        model = agent.model or self.default_model
        return f"{self.base_url(agent)}/v1beta/models/{model}:streamGenerateContent?alt=sse"

    def stream_payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        return self.payload(agent, prompt)  # the endpoint, not the body, asks for a stream

    def stream_decoder(self) -> StreamDecoder:
        return _GeminiStream()

    def headers(self, agent: Agent, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if key:
            headers["x-goog-api-key"] = key
        return headers

    def payload(self, agent: Agent, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        if agent.system_prompt:
            body["systemInstruction"] = {"parts": [{"text": agent.system_prompt}]}
        config: dict[str, Any] = {}
        if agent.max_tokens is not None:
            config["maxOutputTokens"] = agent.max_tokens
        if agent.temperature is not None:
            config["temperature"] = agent.temperature
        if config:
            body["generationConfig"] = config
        return body

    def parse(self, data: Any) -> ChatReply:
        candidates = data["candidates"]
        parts = candidates[0]["content"]["parts"]
        text = "".join(p["text"] for p in parts if "text" in p)
        usage = data.get("usageMetadata") or {}
        # promptTokenCount includes the cached ones (cachedContentTokenCount); thinking tokens
        # (thoughtsTokenCount) are billed as output but not counted in candidatesTokenCount.
        return ChatReply(
            text,
            Usage(
                input_tokens=tokens(usage.get("promptTokenCount"))
                + tokens(usage.get("toolUsePromptTokenCount")),
                output_tokens=tokens(usage.get("candidatesTokenCount"))
                + tokens(usage.get("thoughtsTokenCount")),
                cache_read_tokens=tokens(usage.get("cachedContentTokenCount")),
            ),
            model=text_or_none(data.get("modelVersion")),
            response_id=text_or_none(data.get("responseId")),
            finish_reasons=tuple(
                str(c["finishReason"]) for c in candidates if c.get("finishReason")
            ),
        )


class _GeminiStream(StreamDecoder):
    """One ``GenerateContentResponse`` per event; the last has a ``finishReason``.

    Gemini sends no end marker: a candidate's ``finishReason`` is taken as the end, so that a
    stream cut between two events is told from a finished one.
    """

    def event(self, name: str, data: str) -> str | None:
        document = json.loads(data)
        error = document.get("error")
        if isinstance(error, dict):
            raise StreamErrorEvent(str(error.get("message", "error")), error.get("code"))
        usage = document.get("usageMetadata")
        if usage:
            self.usage = Usage(
                input_tokens=tokens(usage.get("promptTokenCount")),
                output_tokens=tokens(usage.get("candidatesTokenCount")),
            )
        candidates = document.get("candidates") or []
        if not candidates:
            return None
        candidate = candidates[0]
        if candidate.get("finishReason"):
            self.done = True
        parts = (candidate.get("content") or {}).get("parts") or []
        return "".join(p["text"] for p in parts if "text" in p)
