"""Coverage-guided fuzzing of what the gateway parses from the outside, run by hand.

Two targets, the same properties as tests/reliability/test_fuzz.py (hypothesis, in CI), but
driven by libFuzzer through atheris for as long as you let it run:

    sse      upstream bytes, split anywhere, through the SSE decoder (frames + pending must be
             exactly the bytes fed) and the stream meter (never raises, counts never negative)
    request  a request body through `parse_json` and a path through `check_tail`: a value or a
             400 (BadRequest), nothing else

Usage (atheris is not a dependency: `pip install atheris` first, on Linux/x86-64)::

    python -m bench.fuzz_atheris sse -atheris_runs=1000000 /tmp/sse-corpus
    python -m bench.fuzz_atheris request -max_total_time=600

Arguments after the target name go to libFuzzer (`-help=1` lists them). A crash writes the
input to `crash-<sha1>`; replay it with `python -m bench.fuzz_atheris sse crash-<sha1>`.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from typing import Any

TARGETS = ("sse", "request")


def sse_target(data: bytes) -> None:
    """Split `data` at the cut points its first bytes choose; decode and meter the rest."""
    from gateway.meter import StreamMeter
    from gateway.sse import SSEDecoder
    from gateway.tokens import load_tokenizer

    cuts, body = _cuts(data)
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    decoder = SSEDecoder()
    frames = [frame for piece in pieces for frame in decoder.feed_frames(piece)]
    if b"".join(raw for raw, _ in frames) + decoder.pending_raw != body:
        raise AssertionError("the decoder's frames are not the bytes it was fed")
    decoder.flush()
    meter = StreamMeter(load_tokenizer("chars"), _Sink(), prompt_estimate=0)
    for piece in pieces:
        meter.feed(piece)
    tally = meter.finish()
    if min(tally.completion_tokens, tally.reasoning_tokens, tally.chunks) < 0:
        raise AssertionError(f"negative count in {tally}")


def request_target(data: bytes) -> None:
    """The first byte picks `required`; the rest is a body, and (decoded) a path tail."""
    from gateway.errors import BadRequest
    from gateway.request_parse import check_tail, parse_json

    required, body = bool(data[:1]) and data[0] & 1 == 1, data[1:]
    try:
        doc = parse_json(body, required=required)
    except BadRequest:
        pass
    else:
        if doc is not None and not isinstance(doc, dict):
            raise AssertionError(f"parse_json returned {type(doc).__name__}")
    with contextlib.suppress(BadRequest):
        check_tail(body.decode("utf-8", "surrogateescape"))


class _Sink:
    def add(self, completion: int, reasoning: int) -> None:
        if completion < 0 or reasoning < 0:
            raise AssertionError("the meter reported a negative delta")


def _cuts(data: bytes) -> tuple[list[int], bytes]:
    """Up to 8 cut points from the first byte's count and the next bytes, then the body."""
    count = data[0] % 9 if data else 0
    raw, body = data[1 : 1 + count], data[1 + count :]
    return sorted({byte * len(body) // 256 for byte in raw}), body


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(
            f"usage: python -m bench.fuzz_atheris {{{'|'.join(TARGETS)}}} [libFuzzer args]"
        )
    try:
        atheris: Any = importlib.import_module("atheris")  # by hand only: not a dependency
    except ImportError:
        raise SystemExit("atheris is not installed: pip install atheris") from None
    with atheris.instrument_imports():
        import gateway.meter
        import gateway.proxy
        import gateway.sse  # noqa: F401 (instrumented for coverage)
    target: Callable[[bytes], None] = sse_target if argv[1] == "sse" else request_target
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
