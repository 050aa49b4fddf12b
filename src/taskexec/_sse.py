"""An incremental decoder of server-sent events (``text/event-stream``), for every stream.

Bytes go in as they arrive from the socket, complete events come out: ``(event, data)`` pairs,
``event`` being ``"message"`` when the server names none, ``data`` the event's ``data:`` lines
joined by newlines (the WHATWG rules). Lines end in ``\\n`` or ``\\r\\n`` (Gemini sends the
latter); comments (``:``) and fields other than ``event`` and ``data`` are skipped. An event
not finished by a blank line when the stream ends is dropped, as the standard says.
"""

from __future__ import annotations

__all__ = ("SSEDecoder",)


class SSEDecoder:
    """Turns the chunks of one ``text/event-stream`` body into complete events."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = "message"
        self._data: list[str] | None = None

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Return the events that ``chunk`` completes, in order (often none, or one)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        # The last piece has no newline yet: it waits for the next chunk. A line is only
        # decoded once whole, so a character split across chunks is never cut.
        self._buffer = lines.pop()
        events: list[tuple[str, str]] = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if self._data is not None:
                    events.append((self._event, "\n".join(self._data)))
                self._event, self._data = "message", None
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                text = value.decode("utf-8", "replace")
                if self._data is None:
                    self._data = [text]
                else:
                    self._data.append(text)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
        return events
