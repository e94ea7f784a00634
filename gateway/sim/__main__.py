"""`python -m gateway.sim --port P`: the upstream simulator on its own.

Prints `gateway.sim serving on http://HOST:PORT` once it listens (with `--port 0`, the port it
got), and stops on SIGINT or SIGTERM. It serves through `start_sim` rather than `web.run_app`
so that its connection counters (GET /sim/state) work here too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from .server import start_sim
from .steering import SimDefaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = SimDefaults()
    parser = argparse.ArgumentParser(prog="python -m gateway.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--chunks", type=int, default=defaults.chunks)
    parser.add_argument("--delay-ms", type=float, default=defaults.delay_ms)
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    options = SimDefaults(chunks=args.chunks, delay_ms=args.delay_ms, ttft_ms=args.ttft_ms)
    runner, port = await start_sim(args.host, args.port, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gateway.sim serving on http://{args.host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
