"""Process plumbing shared by the bench's own processes (upstream, load generator)."""

from __future__ import annotations

import asyncio
import resource
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


def raise_nofile_limit() -> int:
    """Lift the soft open-file limit to the hard one, since every stream costs a descriptor.

    Returns the limit now in force, so callers can say where their ceiling is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed: the load side must stay cheap."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


def emit(message: msgspec.Struct) -> None:
    """Write one JSON line to stdout, at once: the orchestrator times its reads by these."""
    sys.stdout.buffer.write(msgspec.json.encode(message) + b"\n")
    sys.stdout.buffer.flush()
