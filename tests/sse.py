"""Reading a genq event stream in tests."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from httpx_sse import ServerSentEvent, connect_sse


def read_stream(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    json: Any = None,
) -> list[ServerSentEvent]:
    with connect_sse(client, method, url, headers=dict(headers or {}), json=json) as source:
        source.response.raise_for_status()
        return list(source.iter_sse())


def token_text(events: list[ServerSentEvent]) -> str:
    return "".join(orjson.loads(e.data)["text"] for e in events if e.event == "token")
