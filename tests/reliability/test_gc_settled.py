"""Once serving, the process keeps the cyclic garbage collector off its streams' backs: what
startup built is frozen (never scanned again), and collections, young and full, come far
rarer than at Python's defaults (the requests leave no cycles: see test_fast_path)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import msgspec
import pytest

from gateway import server
from gateway.config import Listen, default_settings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """The test process's collector as it was, whatever serve() did to it."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
async def test_serve_freezes_what_startup_built_and_makes_collections_rarer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gc.unfreeze()
    default = gc.get_threshold()
    settled = asyncio.Event()
    settle_heap = server.settle_heap

    def observed() -> None:
        settle_heap()
        settled.set()

    monkeypatch.setattr(server, "settle_heap", observed)
    settings = msgspec.structs.replace(default_settings(), listen=Listen(port=0))
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(settings, stop=stop))
    try:
        async with asyncio.timeout(30):
            await settled.wait()
        assert gc.get_freeze_count() > 0
        young, middle, full = gc.get_threshold()
        assert young >= 10 * default[0]
        assert middle >= default[1]
        assert full >= 10 * default[2]
    finally:
        stop.set()
        await serving
