"""Per-chunk cost of token accounting, layer by layer, on OpenAI-shaped chat chunks.

    python bench/micro_accounting.py [--chunks 4000] [--repeat 7]

Each feed is one whole SSE event (~230 bytes), as upstreams send a token per event and the
network usually delivers each in one read. Printed figures are the best of `--repeat` runs
over the whole stream, divided by the number of chunks, so they are the cost the relay pays
per chunk on an idle core. The "split" rows feed every event in two reads (the general path)
and still report the cost per event, that is of two feeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from gateway.meter import StreamMeter
from gateway.sse import SSEDecoder
from gateway.tokens import TOKENIZER_NAMES, Tokenizer, load_tokenizer

_WORDS = (
    " the", " model", " streams", " one", " token", " per", " event", ",", " and", " every",
    " chunk", " is", " counted", " as", " it", " passes", ".", " Ré", "sumé", " 東京", "\n\n",
)  # fmt: skip


class _NullSink:
    def add(self, completion: int, reasoning: int) -> None:
        pass


def chat_chunks(n: int, *, reasoning_every: int = 0) -> list[bytes]:
    """`n` chunks shaped like OpenAI's (same keys, ids and fingerprint)."""
    out = []
    for i in range(n):
        field = "reasoning_content" if reasoning_every and i % reasoning_every == 0 else "content"
        body = {
            "id": "chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012",
            "object": "chat.completion.chunk",
            "created": 1732390000,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_831e067d82",
            "choices": [
                {
                    "index": 0,
                    "delta": {field: _WORDS[i % len(_WORDS)]},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        out.append(b"data: " + orjson.dumps(body) + b"\n\n")
    return out


def best_us_per_chunk(run: Callable[[], None], chunks: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - start)
    return best / chunks / 1000


def decoder_only(chunks: Sequence[bytes]) -> Callable[[], None]:
    def run() -> None:
        feed = SSEDecoder().feed
        for chunk in chunks:
            feed(chunk)

    return run


def decoder_json_walk(chunks: Sequence[bytes]) -> Callable[[], None]:
    """The floor under any meter: decode, parse, reach the content string."""

    def run() -> None:
        feed = SSEDecoder().feed
        for chunk in chunks:
            for event in feed(chunk):
                obj = orjson.loads(event.data)
                for choice in obj["choices"]:
                    choice["delta"].get("content")

    return run


def meter(chunks: Sequence[bytes], tokenizer: Tokenizer) -> Callable[[], None]:
    def run() -> None:
        stream = StreamMeter(tokenizer, _NullSink(), 0)
        for chunk in chunks:
            stream.feed(chunk)
        stream.finish()

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    n, repeat = args.chunks, args.repeat
    chunks = chat_chunks(n)
    halves = [part for c in chunks for part in (c[: len(c) // 2], c[len(c) // 2 :])]
    mixed = chat_chunks(n, reasoning_every=3)
    tokenizers = {name: load_tokenizer(name) for name in TOKENIZER_NAMES}
    mean_bytes = sum(map(len, chunks)) / n
    print(f"{n} chunks of {mean_bytes:.0f} bytes on average, best of {repeat} runs")
    rows: list[tuple[str, Callable[[], None]]] = [
        ("decoder alone", decoder_only(chunks)),
        ("decoder, split in 2 reads", decoder_only(halves)),
        ("decoder + orjson + dict walk", decoder_json_walk(chunks)),
    ]
    rows += [(f"meter, {name}", meter(chunks, t)) for name, t in tokenizers.items()]
    rows.append(("meter, o200k_base, split in 2 reads", meter(halves, tokenizers["o200k_base"])))
    rows.append(("meter, o200k_base, 1/3 reasoning", meter(mixed, tokenizers["o200k_base"])))
    for label, run in rows:
        print(f"{label:<40} {best_us_per_chunk(run, n, repeat):6.2f} µs/chunk")


if __name__ == "__main__":
    main()
