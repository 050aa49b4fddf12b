"""Usage with cache tokens and cost: each vendor's usage fields, the price table, Agent.price."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest
from genai_prices.types import TieredPrices
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from taskexec import Agent, AgentTask, ExecutionResult, PlanError, Price, TaskExecutor, Usage
from taskexec import _pricing as pricing
from taskexec._pricing import (
    Rates,
    is_priced,
    prompt_token_bound,
    table_provider_id,
    usage_cost,
    worst_case_cost,
)
from taskexec.providers import AnthropicProvider, GeminiProvider, OpenAIProvider
from taskexec.testing import MockServer

from .conftest import FAST_RETRY, openai_agent

PRICE = Price(
    input_per_mtok=2.5, output_per_mtok=10, cache_read_per_mtok=0.25, cache_write_per_mtok=3.75
)


def table(provider: str, model: str, usage: Usage) -> Decimal:
    """The table's own figure for ``usage``, computed now, the way genai-prices documents it."""
    found = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        ),
        model,
        provider_id=table_provider_id(provider),
    )
    total: Decimal = found.total_price
    return total


# -- models -------------------------------------------------------------------------------------


@given(
    st.builds(
        Usage,
        input_tokens=st.integers(0, 10**9),
        output_tokens=st.integers(0, 10**9),
        cache_read_tokens=st.integers(0, 10**9),
        cache_write_tokens=st.integers(0, 10**9),
        cost_usd=st.none() | st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
    )
)
def test_usage_round_trips_exactly(usage: Usage) -> None:
    assert Usage.model_validate_json(usage.model_dump_json()) == usage


def test_a_result_line_written_before_cost_still_loads() -> None:
    line = json.dumps(
        {
            "task_id": "t",
            "status": "success",
            "agent": "a",
            "mode": "llm",
            "engine": "async",
            "attempts": 1,
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01Z",
            "duration_s": 1.0,
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }
    )
    usage = ExecutionResult.model_validate_json(line).usage
    assert (usage.cache_read_tokens, usage.cache_write_tokens, usage.cost_usd) == (0, 0, None)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_prices_and_costs_are_finite_and_not_negative(bad: float) -> None:
    with pytest.raises(ValidationError):
        Price(input_per_mtok=bad, output_per_mtok=1)
    with pytest.raises(ValidationError):
        Price(input_per_mtok=1, output_per_mtok=1, cache_read_per_mtok=bad)
    with pytest.raises(ValidationError):
        Usage(cost_usd=bad)


def test_price_and_max_cost_in_a_plan_file(tmp_path: Path) -> None:
    from taskexec import load_plan

    good = tmp_path / "plan.yaml"
    good.write_text(
        "agents:\n"
        "  - name: local\n"
        "    price: {input_per_mtok: 0.5, output_per_mtok: 1.5}\n"
        "tasks:\n  - {id: t, prompt: hi}\n"
        "settings: {max_cost_usd: 2.5}\n"
    )
    plan = load_plan(good)
    assert plan.agents[0].price == Price(input_per_mtok=0.5, output_per_mtok=1.5)
    assert plan.settings.max_cost_usd == 2.5

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "agents:\n"
        "  - name: local\n"
        "    price: {input_per_mtok: -1, output_per_mtok: 1, per_token: 3}\n"
        "tasks:\n  - {id: t, prompt: hi}\n"
        "settings: {max_cost_usd: 0}\n"
    )
    with pytest.raises(PlanError) as caught:
        load_plan(bad)
    message = str(caught.value)
    assert str(bad) in message
    assert "agents[0] (name 'local').price.input_per_mtok" in message
    assert "agents[0] (name 'local').price.per_token" in message
    assert "settings.max_cost_usd" in message


# -- prices -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("gemini", "gemini-2.5-flash"),
    ],
)
@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=1200, output_tokens=340),
        Usage(input_tokens=5000, output_tokens=10, cache_read_tokens=4096),
        Usage(input_tokens=5000, output_tokens=10, cache_read_tokens=1000, cache_write_tokens=3000),
        Usage(),
    ],
)
def test_known_models_cost_what_the_table_says(provider: str, model: str, usage: Usage) -> None:
    agent = Agent(name="a", provider=provider, model=model)
    assert usage_cost(agent, usage) == table(provider, model, usage)
    assert is_priced(agent)


def test_the_default_model_of_a_provider_is_priced() -> None:
    agent = Agent(name="a", provider="anthropic")  # claude-sonnet-4-5 when none is named
    usage = Usage(input_tokens=10, output_tokens=10)
    assert usage_cost(agent, usage) == table("anthropic", AnthropicProvider.default_model, usage)


def test_cached_tokens_are_charged_once_at_their_own_rate() -> None:
    # The table's own per-token rates for a model with all three input rates.
    rates = (
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=0), "claude-sonnet-4-5", provider_id="anthropic"
        )
    ).model_price
    usage = Usage(
        input_tokens=1000, output_tokens=100, cache_read_tokens=600, cache_write_tokens=300
    )

    def rate(value: object) -> Decimal:
        # Tiered (by prompt size): far below the first tier, the base rate applies.
        base = value.base if isinstance(value, TieredPrices) else value
        assert isinstance(base, Decimal)
        return base

    expected = (
        100 * rate(rates.input_mtok)
        + 600 * rate(rates.cache_read_mtok)
        + 300 * rate(rates.cache_write_mtok)
        + 100 * rate(rates.output_mtok)
    ) / 1_000_000
    agent = Agent(name="a", provider="anthropic", model="claude-sonnet-4-5")
    assert usage_cost(agent, usage) == expected
    # Not a flat rate: a price that ignored the cache would not match.
    assert rate(rates.cache_read_mtok) < rate(rates.input_mtok) < rate(rates.cache_write_mtok)


def test_agent_price_wins_over_the_table() -> None:
    agent = Agent(name="a", provider="openai", model="gpt-4o-mini", price=PRICE)
    usage = Usage(
        input_tokens=1000, output_tokens=100, cache_read_tokens=600, cache_write_tokens=300
    )
    expected = (
        Decimal(100) * Decimal("2.5")
        + Decimal(600) * Decimal("0.25")
        + Decimal(300) * Decimal("3.75")
        + Decimal(100) * Decimal(10)
    ) / 1_000_000
    assert usage_cost(agent, usage) == expected
    assert usage_cost(agent, usage) != table("openai", "gpt-4o-mini", usage)


def test_unset_cache_prices_are_the_input_price() -> None:
    rates = Rates.of(Price(input_per_mtok=3, output_per_mtok=15))
    assert rates.cache_read == rates.cache_write == rates.input == Decimal(3)


def test_an_unknown_model_has_no_price_not_a_guess() -> None:
    local = Agent(name="llama", provider="openai", model="llama3.1:8b", base_url="http://x.test/v1")
    assert usage_cost(local, Usage(input_tokens=10, output_tokens=10)) is None
    assert not is_priced(local)
    assert worst_case_cost(local, "hi") is None
    unknown_vendor = Agent(name="x", provider="mistral-custom", model="m")
    assert usage_cost(unknown_vendor, Usage(input_tokens=1)) is None
    # A price set by hand makes it known, a zero price included.
    free = local.model_copy(update={"price": Price(input_per_mtok=0, output_per_mtok=0)})
    assert usage_cost(free, Usage(input_tokens=10, output_tokens=10)) == 0


def test_the_reply_model_is_priced_first_then_the_request_model() -> None:
    agent = Agent(name="a", provider="openai", model="gpt-4o-mini")
    usage = Usage(input_tokens=100, output_tokens=100)
    dated = "gpt-4o-2024-08-06"
    assert usage_cost(agent, usage, dated) == table("openai", dated, usage)
    assert usage_cost(agent, usage, "not-a-model") == table("openai", "gpt-4o-mini", usage)


def test_vendor_cache_counts_beyond_the_input_are_clamped() -> None:
    agent = Agent(name="a", provider="openai", model="gpt-4o-mini")
    odd = Usage(input_tokens=10, output_tokens=0, cache_read_tokens=50, cache_write_tokens=50)
    assert usage_cost(agent, odd) == table(
        "openai",
        "gpt-4o-mini",
        odd.model_copy(update={"cache_read_tokens": 10, "cache_write_tokens": 0}),
    )


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=200))
def test_costs_add_up_without_float_drift(counts: list[int]) -> None:
    rates = Rates.of(Price(input_per_mtok=0.1, output_per_mtok=0.3))
    total = sum((rates.cost(Usage(input_tokens=n, output_tokens=n)) for n in counts), Decimal(0))
    assert total == Decimal(sum(counts)) * Decimal("0.4") / 1_000_000


def test_the_prompt_bound_is_never_below_the_bytes() -> None:
    agent = Agent(name="a", system_prompt="système")
    assert (
        prompt_token_bound(agent, "héllo")
        == len("héllo".encode()) + len("système".encode()) + pricing.PROMPT_OVERHEAD_TOKENS
    )


def test_worst_case_charges_every_input_token_at_the_dearer_rate() -> None:
    agent = Agent(name="a", provider="offline", price=PRICE, max_tokens=100)
    tokens_in = prompt_token_bound(agent, "hello")
    expected = (tokens_in * Decimal("3.75") + 100 * Decimal(10)) / 1_000_000
    assert worst_case_cost(agent, "hello") == expected
    no_limit = agent.model_copy(update={"max_tokens": None})
    assert (
        worst_case_cost(no_limit, "hello")
        == (tokens_in * Decimal("3.75") + 1024 * Decimal(10)) / 1_000_000
    )


# -- each vendor's usage fields, over real HTTP -------------------------------------------------


async def test_vendors_report_cache_tokens_in_one_form(mock_server: MockServer) -> None:
    prompt = "one two three four five six seven eight [[cached=4]] [[cache_write=2]]"
    words = len(prompt.split())
    agents = [
        openai_agent(mock_server, "o", model="gpt-4o-mini"),
        Agent(name="c", provider="anthropic", model="claude-sonnet-4-5", base_url=mock_server.url),
        Agent(name="g", provider="gemini", model="gemini-2.5-flash", base_url=mock_server.url),
    ]
    async with TaskExecutor(agents, retry_policy=FAST_RETRY) as executor:
        results = {
            a.name: await executor.execute(AgentTask(id=a.name, prompt=prompt), agent=a.name)
            for a in agents
        }
    assert mock_server.stats.chat_requests == 3
    # OpenAI and Gemini report no cache writes; Anthropic's input_tokens excludes both kinds,
    # and taskexec adds them back: input_tokens is every prompt token on every vendor.
    expected = {
        "o": Usage(input_tokens=words, output_tokens=words + 3, cache_read_tokens=4),
        "c": Usage(
            input_tokens=words, output_tokens=words + 3, cache_read_tokens=4, cache_write_tokens=2
        ),
        "g": Usage(input_tokens=words, output_tokens=words + 3, cache_read_tokens=4),
    }
    for agent in agents:
        result = results[agent.name]
        assert result.ok, result.error
        counts = result.usage.model_copy(update={"cost_usd": None})
        assert counts == expected[agent.name]
        assert agent.model is not None
        assert result.usage.cost_usd == float(table(agent.provider, agent.model, counts))


def test_gemini_thinking_tokens_are_output_tokens() -> None:
    reply = GeminiProvider().parse(
        {
            "candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {
                "promptTokenCount": 10,
                "candidatesTokenCount": 5,
                "thoughtsTokenCount": 7,
                "cachedContentTokenCount": 4,
            },
            "modelVersion": "gemini-2.5-flash",
            "responseId": "r1",
        }
    )
    assert reply.usage == Usage(input_tokens=10, output_tokens=12, cache_read_tokens=4)
    assert (reply.model, reply.response_id, reply.finish_reasons) == (
        "gemini-2.5-flash",
        "r1",
        ("STOP",),
    )


def test_replies_name_their_model_id_and_finish_reasons() -> None:
    openai = OpenAIProvider().parse(
        {
            "id": "chatcmpl-1",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"message": {"content": "x"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )
    assert (openai.model, openai.response_id, openai.finish_reasons) == (
        "gpt-4o-mini-2024-07-18",
        "chatcmpl-1",
        ("length",),
    )
    anthropic = AnthropicProvider().parse({"content": [], "usage": {"input_tokens": 1}})
    assert (anthropic.model, anthropic.response_id, anthropic.finish_reasons) == (None, None, ())


async def test_offline_results_are_free_and_deterministic() -> None:
    agents = [Agent(name="free"), Agent(name="paid", price=PRICE)]
    async with TaskExecutor(agents) as executor:
        first = await executor.execute(AgentTask(id="t", prompt="a b c"), agent="free")
        paid = await executor.execute(AgentTask(id="t", prompt="a b c"), agent="paid")
        again = await executor.execute(AgentTask(id="t", prompt="a b c"), agent="paid")
    assert first.usage.cost_usd == 0.0
    assert paid.usage == again.usage
    assert paid.usage.cost_usd == float(Rates.of(PRICE).cost(paid.usage))
    assert paid.usage.cost_usd is not None
    assert paid.usage.cost_usd > 0


async def test_a_failed_request_costs_nothing_known(mock_server: MockServer) -> None:
    agent = openai_agent(mock_server, model="gpt-4o-mini", max_retries=0)
    async with TaskExecutor([agent]) as executor:
        failed = await executor.execute(AgentTask(id="t", prompt="x [[fault=400]]"))
    assert not failed.ok
    assert failed.usage == Usage(cost_usd=0.0)
    assert mock_server.stats.chat_requests == 1
