"""``taskexec mock-server``: the mock LLM server, for trying taskexec with no keys.

The server (:mod:`taskexec.testing`, on ``aiohttp.web``) is imported only when this command
runs or its help is shown, so that no other command pays for it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno

from ._args import faults, positive_int
from ._output import UsageError
from ._signals import Interrupts
from ._status import EXIT_OK

__all__ = ("LazyEpilogParser", "mock_server", "register")


class LazyEpilogParser(argparse.ArgumentParser):
    """A parser whose epilog is read only when its help is shown."""

    lazy_epilog: str | None = None

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            from .. import testing

            self.epilog = getattr(testing, self.lazy_epilog)
        return super().format_help()


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``mock-server`` command."""
    mock = commands.add_parser(
        "mock-server",
        help="serve the mock LLM server until Ctrl-C",
        description="Serve a mock of the OpenAI, Anthropic and Gemini APIs and of an api-mode "
        "agent on loopback, for trying taskexec with no keys and for tests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if isinstance(mock, LazyEpilogParser):
        mock.lazy_epilog = "USAGE"  # the endpoints, faults and directives, from the server
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8765)
    mock.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    mock.add_argument("--faults", type=faults, default=[], help="e.g. 429,500,reset")
    mock.add_argument(
        "--rate-limit",
        type=positive_int,
        metavar="N",
        help="at most N chat requests in any second (429 beyond)",
    )
    mock.add_argument(
        "--token-limit",
        type=positive_int,
        metavar="N",
        help="at most N tokens in any second (429 beyond)",
    )
    mock.set_defaults(handler=mock_server)


def mock_server(args: argparse.Namespace) -> int:
    """Serve the mock server until Ctrl-C or SIGTERM; return the exit code."""
    from ..testing import MockServer  # only this command loads aiohttp.web

    async def serve() -> None:
        server = MockServer(
            args.host,
            args.port,
            latency_s=args.latency,
            faults=args.faults,
            rate_limit=args.rate_limit,
            token_limit=args.token_limit,
        )
        await server.start()
        print(f"taskexec mock server listening on {server.url}", flush=True)
        print(f"  OpenAI-compatible base_url: {server.openai_base_url}", flush=True)
        print(f"  Anthropic / Gemini base_url: {server.url}", flush=True)
        print(f"  api-mode agent url: {server.agent_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in Interrupts.signals():
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop()

    try:
        # The command line's own entry point: it owns the process's event loop.
        asyncio.run(serve())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"cannot listen on {where}: the port is taken; use --port") from None
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return EXIT_OK
