"""Keeping keys out of every text taskexec writes: results, JSONL lines, logs and reprs.

Text that came from elsewhere (an error body, a script's stderr, an exception's message) may
contain a key: a server that echoes it back, a script that prints its environment. Such text is
redacted *before* it is cut to length, so a key that straddles the cut cannot leave its first
characters behind; and a piece of a key of :data:`MIN_PARTIAL` characters or more at either end
of a text (a body that was itself cut short upstream) is redacted too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ("MASK", "MIN_PARTIAL", "Redactor")

MASK = "***"
#: The shortest piece of a key, at the start or end of a text, that is still redacted.
MIN_PARTIAL = 6
#: Keys shorter than this are not redacted piecewise: six characters of a four-character "key"
#: cannot be told from ordinary text.
_MIN_SECRET = 8


class Redactor:
    """Replaces secrets, and pieces of them at a text's edges, by ``***``.

    Args:
        secrets: The secrets; empty and ``None`` values are ignored.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so that a key containing another key is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def for_environment(cls, names: Iterable[str], *extra: str | None) -> Redactor:
        """Return a redactor for the values of environment variables ``names``, and ``extra``."""
        return cls([*(os.environ.get(name) for name in names), *extra])

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._secrets)} secret(s)>"

    def __call__(self, text: str) -> str:
        """Return ``text`` with every secret, and any piece of one at either end, redacted."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return self._edges(text)

    def cut(self, text: str, limit: int, *, keep: str = "head") -> str:
        """Redact ``text``, then keep its first (``keep="head"``) or last (``"tail"``) ``limit``
        characters, then redact a piece of a secret left at the cut."""
        text = self(text)
        if len(text) > limit:
            text = text[:limit] if keep == "head" else text[-limit:]
            text = self._edges(text)
        return text

    def _edges(self, text: str) -> str:
        for secret in self._secrets:
            if len(secret) < _MIN_SECRET:
                continue
            longest = min(len(secret) - 1, len(text))
            for size in range(longest, MIN_PARTIAL - 1, -1):
                if text.endswith(secret[:size]):
                    text = text[:-size] + MASK
                    break
            longest = min(len(secret) - 1, len(text))
            for size in range(longest, MIN_PARTIAL - 1, -1):
                if text.startswith(secret[-size:]):
                    text = MASK + text[size:]
                    break
        return text
