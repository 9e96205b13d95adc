"""Reading the gateway's server-sent events as a client does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON payload) for each event: "message" unless the event names itself ("error")."""
    event = "message"
    async for line in response.content:
        if line.startswith(b"event: "):
            event = line[7:].strip().decode()
        elif line.startswith(b"data: "):
            yield event, json.loads(line[6:])
            event = "message"
