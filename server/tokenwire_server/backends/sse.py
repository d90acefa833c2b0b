"""Server-Sent Events parsing for OpenAI-compatible streams.

Follows the WHATWG event-stream rules the upstreams rely on: `:` lines are
comments (keep-alives), `data:` lines of one event are joined with newlines,
an empty line ends the event, and a field's single leading space is dropped.
Line splitting across network reads is httpx's `aiter_lines`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yields the data of each event, in order; comments and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
    if data:
        yield "\n".join(data)
