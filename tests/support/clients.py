"""Clients built off the event loop: creating an SDK client reads CA files from disk, which
blockbuster rightly flags as a blocking call on the loop."""

from __future__ import annotations

import asyncio

import openai


async def async_openai(
    base_url: str, api_key: str = "anything", **kwargs: object
) -> openai.AsyncOpenAI:
    return await asyncio.to_thread(
        lambda: openai.AsyncOpenAI(base_url=base_url, api_key=api_key, **kwargs)  # type: ignore[arg-type]
    )
