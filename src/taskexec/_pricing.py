"""What a model's tokens cost: the agent's own :class:`~taskexec.Price`, else a maintained table.

The table is `genai-prices <https://github.com/pydantic/genai-prices>`_ (MIT, the data
pydantic-ai prices runs with), imported on the first lookup only: the offline provider and
agents with a ``price`` never load it. A model neither knows costs ``None``, never a guess.

All arithmetic is in :class:`~decimal.Decimal` (prices are decimal numbers, and a float sum of
10,000 small costs drifts); a cost becomes a ``float`` only where it is stored in
:attr:`Usage.cost_usd <taskexec.Usage.cost_usd>`.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ._limits import DEFAULT_COMPLETION_TOKENS
from ._models import Agent, Price, Usage

__all__ = (
    "PROMPT_OVERHEAD_TOKENS",
    "Rates",
    "cost_usd",
    "is_priced",
    "load_table",
    "model_of",
    "needs_table",
    "priced",
    "prompt_token_bound",
    "table_provider_id",
    "to_decimal",
    "usage_cost",
    "worst_case_cost",
)

_MTOK = Decimal(1_000_000)
#: Tokens a chat request adds around the prompt and system prompt (role markers, the reply's
#: priming): a few per message on every vendor; this bounds them with room to spare.
PROMPT_OVERHEAD_TOKENS = 16
#: taskexec's provider names that the table spells differently.
_TABLE_PROVIDER_IDS = {"gemini": "google"}
#: Providers that cost nothing (they answer in-process).
_FREE_PROVIDERS = frozenset({"offline"})


def to_decimal(value: float) -> Decimal:
    """Return the decimal a float was written as (``0.15`` -> ``Decimal('0.15')``, not the
    binary fraction ``0.1499999999999999944...``)."""
    return Decimal(repr(value))


@dataclass(frozen=True, slots=True)
class Rates:
    """An agent's :class:`~taskexec.Price` as decimals, in USD per million tokens."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal

    @classmethod
    def of(cls, price: Price) -> Rates:
        """Return the rates of ``price``; an unset cache price is the input price."""
        base = to_decimal(price.input_per_mtok)
        read, write = price.cache_read_per_mtok, price.cache_write_per_mtok
        return cls(
            input=base,
            output=to_decimal(price.output_per_mtok),
            cache_read=base if read is None else to_decimal(read),
            cache_write=base if write is None else to_decimal(write),
        )

    def cost(self, usage: Usage) -> Decimal:
        """Return the exact cost of ``usage``: each input token at one rate, never two.

        ``input_tokens`` includes the cache reads and writes (:class:`~taskexec.Usage`), so
        only the rest is charged at the input rate.
        """
        cached = usage.cache_read_tokens + usage.cache_write_tokens
        uncached = max(0, usage.input_tokens - cached)
        total = (
            uncached * self.input
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
            + usage.output_tokens * self.output
        )
        return total / _MTOK


def needs_table(agent: Agent) -> bool:
    """True when pricing ``agent``'s calls takes the maintained table (no price of its own)."""
    return agent.price is None and agent.provider not in _FREE_PROVIDERS


_table_loaded = False


def _import_table() -> None:
    global _table_loaded
    import genai_prices  # noqa: F401 (loaded for the lookups that follow)

    _table_loaded = True


async def load_table() -> None:
    """Load the price table in a worker thread, once: its import takes about 160 ms, which
    would otherwise stall every task on the event loop at the first priced reply."""
    if not _table_loaded:
        # A flag, not sys.modules: a module another thread is still importing is already in
        # sys.modules, and importing it from the loop would wait for that thread, blocking.
        await asyncio.to_thread(_import_table)


def table_provider_id(provider: str) -> str:
    """Return the table's name for a taskexec provider (``gemini`` is ``google`` there)."""
    return _TABLE_PROVIDER_IDS.get(provider, provider)


def model_of(agent: Agent) -> str | None:
    """Return the model an agent's requests name: its ``model``, else its provider's default."""
    if agent.model:
        return agent.model
    from .providers import get_provider  # the providers import this module's users

    try:
        default = getattr(get_provider(agent.provider), "default_model", None)
    except LookupError:  # pragma: no cover - an unknown provider fails before pricing
        return None
    return default if isinstance(default, str) else None


def usage_cost(agent: Agent, usage: Usage, model: str | None = None) -> Decimal | None:
    """Return what ``usage`` of ``agent`` cost in USD, or None when the price is unknown.

    Args:
        agent: The agent; its ``price`` wins over the table.
        usage: Token counts (``cost_usd`` is ignored).
        model: The model the reply names, when it does (a dated version the table may know
            better); the request's model is tried after it.
    """
    if agent.price is not None:
        return Rates.of(agent.price).cost(usage)
    if agent.provider in _FREE_PROVIDERS:
        return Decimal(0)
    try:
        version = _table_version()
    except ImportError:  # pragma: no cover - a core dependency, unless removed by hand
        return None
    provider = table_provider_id(agent.provider)
    # The table refuses cache counts beyond the input count: a vendor's slip costs the
    # tokens at the input rate rather than no price at all.
    read = min(usage.cache_read_tokens, usage.input_tokens)
    write = min(usage.cache_write_tokens, usage.input_tokens - read)
    counts = (usage.input_tokens, usage.output_tokens, read, write)
    for name in dict.fromkeys(m for m in (model, model_of(agent)) if m):
        found = _table_cost(provider, name, *counts, *version)
        if found is not None:
            return found
    return None


def cost_usd(agent: Agent, usage: Usage, model: str | None = None) -> float | None:
    """Return :func:`usage_cost` as the float stored in ``Usage.cost_usd``."""
    cost = usage_cost(agent, usage, model)
    return None if cost is None else float(cost)


def priced(agent: Agent, usage: Usage, model: str | None = None) -> Usage:
    """Return ``usage`` with its ``cost_usd`` filled in (None when the price is unknown)."""
    return usage.model_copy(update={"cost_usd": cost_usd(agent, usage, model)})


def is_priced(agent: Agent) -> bool:
    """Return True when the cost of the agent's requests is known (its price or the table's)."""
    return usage_cost(agent, Usage(input_tokens=1, output_tokens=1)) is not None


def prompt_token_bound(agent: Agent, prompt: str) -> int:
    """Return at most how many input tokens a request of ``prompt`` can count.

    An upper bound, not an estimate: a token of every vendor's tokenizer (byte-level BPE,
    SentencePiece with byte fallback) covers at least one byte of UTF-8, so the bytes of the
    prompt and system prompt, plus the request's framing, are never fewer than its tokens.
    """
    text = len(prompt.encode()) + len((agent.system_prompt or "").encode())
    return text + PROMPT_OVERHEAD_TOKENS


def worst_case_cost(agent: Agent, prompt: str) -> Decimal | None:
    """Return the most one request of ``prompt`` can cost ``agent``, or None if unpriced.

    Every input token is charged at the dearer of the input and cache-write rates, and the
    reply at ``max_tokens`` (1024 when the agent sets none: OpenAI-compatible and Gemini
    requests then carry no limit, so the reply may cost more; set ``max_tokens`` for a hard
    bound).
    """
    tokens_in = prompt_token_bound(agent, prompt)
    tokens_out = agent.max_tokens or DEFAULT_COMPLETION_TOKENS
    plain = usage_cost(agent, Usage(input_tokens=tokens_in, output_tokens=tokens_out))
    if plain is None:
        return None
    written = usage_cost(
        agent,
        Usage(input_tokens=tokens_in, output_tokens=tokens_out, cache_write_tokens=tokens_in),
    )
    return plain if written is None else max(plain, written)


def _table_version() -> tuple[int, str]:
    """What a cached table lookup depends on besides its arguments: the table in use (an
    ``UpdatePrices`` the application started replaces it) and the day (prices have dates)."""
    from genai_prices import data_snapshot

    return id(data_snapshot.get_snapshot()), datetime.now(UTC).date().isoformat()


@functools.lru_cache(maxsize=4096)
def _table_cost(
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    snapshot: int,
    day: str,
) -> Decimal | None:
    # Cached: a lookup in the table takes about 60 us, and a run repeats the same shapes
    # (every reservation of an agent's tasks with the same prompt length, for one).
    import genai_prices

    usage: Any = genai_prices.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
    )
    try:
        found = genai_prices.calc_price(usage, model, provider_id=provider)
    except LookupError:
        return None
    total: Decimal = found.total_price
    return total
