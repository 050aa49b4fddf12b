"""What a transport raises when no complete response arrived, for every HTTP client taskexec has.

A module of its own so that the clients (:mod:`taskexec._http`) and their streaming responses
(:mod:`taskexec._http_stream`) share it without importing each other.
"""

from __future__ import annotations

from typing import Literal

__all__ = ("TransportError", "describe_error")


class TransportError(Exception):
    """No complete response arrived: the connection failed or the attempt timed out."""

    def __init__(self, kind: Literal["connection", "timeout"], message: str) -> None:
        super().__init__(kind, message)
        self.kind: Literal["connection", "timeout"] = kind
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe_error(exc: BaseException) -> str:
    """An exception as a transport error's message: its type, and its text when it has one."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text
