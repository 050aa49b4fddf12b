"""The offline provider: deterministic replies with no network, for quickstarts and tests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncGenerator
from typing import ClassVar

from .._http import ClientPool
from .._models import Agent, Usage
from .base import ChatReply, Provider, StreamReply

__all__ = ("OfflineProvider", "offline_pieces", "offline_reply")

_PIECE = re.compile(r"\s*\S+")


def offline_pieces(text: str) -> list[str]:
    """Split a reply into the pieces its stream yields: each word with the spaces before it.

    ``"".join(offline_pieces(text)) == text`` for every text whose end is not whitespace.
    """
    pieces = _PIECE.findall(text)
    rest = text[sum(map(len, pieces)) :]
    return [*pieces, rest] if rest else pieces


def offline_reply(agent: str, model: str | None, prompt: str) -> str:
    """Return the offline provider's reply: a pure function of (agent, model, prompt)."""
    model = model or "offline"
    digest = hashlib.sha256(f"{agent}\0{model}\0{prompt}".encode()).hexdigest()[:12]
    first_line = prompt.strip().splitlines()[0] if prompt.strip() else ""
    if len(first_line) > 120:
        first_line = first_line[:117] + "..."
    return f"[{agent}/{model} {digest}] Done: {first_line}"


class OfflineProvider(Provider):
    """Answers at once from (agent, model, prompt); never touches the network."""

    name: ClassVar[str] = "offline"

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        text = offline_reply(agent.name, agent.model, prompt)
        usage = Usage(input_tokens=len(prompt.split()), output_tokens=len(text.split()))
        return ChatReply(text, usage)

    async def stream(
        self,
        agent: Agent,
        prompt: str,
        pool: ClientPool,
        timeout_s: float | None,
        reply: StreamReply,
    ) -> AsyncGenerator[str, None]:
        whole = await self.complete(agent, prompt, pool, timeout_s)
        reply.usage = whole.usage
        for piece in offline_pieces(whole.text):
            yield piece
