"""Fixtures every test shares.

Each test runs under blockbuster, which fails it when the event loop makes a blocking call
(a file read, a sleep, a socket call without await): the relay must never stall other streams.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    with blockbuster_ctx() as bb:
        yield bb
