"""Server-sent events as the tests read them: one parser for every suite."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of a server-sent event stream, split on the protocol's own line ends
    only: generated text may hold U+0085 or U+2028, which `iter_lines` would split on."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in raw.decode().split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
            if data:
                yield event, json.loads("\n".join(data))
