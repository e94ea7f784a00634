"""Tokenizers and the prompt estimate.

The pinned ids are the published outputs of OpenAI's tiktoken for these encodings (the
same values appear in tiktoken's tests and in the test suites of its ports), so they
check the shipped tables and the split patterns, not this code against itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tiktoken_ext.openai_public  # type: ignore[import-untyped]  # no py.typed
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tokens import (
    BpeTokenizer,
    Tokenizer,
    _read_checked,
    estimate_prompt_tokens,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]

PUBLISHED_IDS = {
    "o200k_base": {
        "hello world": [24912, 2375],
        " 日本語とEnglish 12345!\n": [17428, 40909, 5330, 28881, 220, 7633, 2548, 4175],
        "a\n\n": [64, 279],
        "<|endoftext|>": [27, 91, 419, 1440, 919, 91, 29],
    },
    "cl100k_base": {
        "hello world": [15339, 1917],
        " 日本語とEnglish 12345!\n": [
            76502,
            22656,
            45918,
            252,
            19732,
            23392,
            220,
            4513,
            1774,
            4999,
        ],
        "a\n\n": [64, 271],
        "<|endoftext|>": [27, 91, 8862, 728, 428, 91, 29],
        "tiktoken is great!": [83, 1609, 5963, 374, 2294, 0],
    },
}


@pytest.fixture(scope="module")
def bpe() -> dict[str, BpeTokenizer]:
    tokenizers = {name: load_tokenizer(name) for name in PUBLISHED_IDS}
    assert all(isinstance(t, BpeTokenizer) for t in tokenizers.values())
    return {name: t for name, t in tokenizers.items() if isinstance(t, BpeTokenizer)}


@pytest.mark.parametrize(
    ("name", "text"), [(n, t) for n, cases in PUBLISHED_IDS.items() for t in cases]
)
def test_bpe_ids_match_openai_published_ones(
    bpe: dict[str, BpeTokenizer], name: str, text: str
) -> None:
    expected = PUBLISHED_IDS[name][text]
    assert bpe[name].encoding.encode_ordinary(text) == expected
    assert bpe[name].count(text) == len(expected)


def test_special_token_text_in_output_counts_as_plain_text(bpe: dict[str, BpeTokenizer]) -> None:
    assert bpe["o200k_base"].count("<|endoftext|>") == 7


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("chunks", "", 0),
        ("chunks", "a whole sentence in one piece", 1),
        ("chars", "", 0),
        ("chars", "abcd", 1),
        ("chars", "abcde", 2),
        ("chars", "☃☃☃☃☃☃☃☃", 2),
    ],
)
def test_table_free_tokenizers(name: str, text: str, expected: int) -> None:
    tokenizer = load_tokenizer(name)
    assert tokenizer.name == name
    assert tokenizer.count(text) == expected


def test_unknown_tokenizer_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="o200k_base, cl100k_base, chunks, chars"):
        load_tokenizer("p50k_base")


def test_tables_are_loaded_once_per_process(bpe: dict[str, BpeTokenizer]) -> None:
    assert load_tokenizer("o200k_base") is bpe["o200k_base"]


def test_a_table_that_is_not_openais_file_is_refused() -> None:
    with pytest.raises(ValueError, match="sha256"):
        _read_checked("cl100k_base.tiktoken.gz", "0" * 64)


def test_patterns_and_special_tokens_match_tiktokens_own(
    bpe: dict[str, BpeTokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our restated tables equal what tiktoken_ext builds, given the same ranks file."""
    hashes: list[str] = []

    def shipped_ranks(url: str, expected_hash: str) -> dict[bytes, int]:
        hashes.append(expected_hash)
        return bpe[url.rsplit("/", 1)[-1].removesuffix(".tiktoken")].encoding._mergeable_ranks

    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", shipped_ranks)
    for name, tokenizer in bpe.items():
        theirs = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]()
        ours = tokenizer.encoding
        assert ours._pat_str == theirs["pat_str"]
        assert ours._special_tokens == theirs["special_tokens"]
    assert hashes == [
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ]


_OFFLINE_LOAD = textwrap.dedent(
    """
    import json, sys

    def no_network(event, args):
        if event.startswith("socket."):
            raise RuntimeError(f"network use: {event}")

    sys.addaudithook(no_network)
    from gateway.tokens import load_tokenizer
    names = ("o200k_base", "cl100k_base")
    print(json.dumps({n: load_tokenizer(n).count("hello world") for n in names}))
    """
)


def test_loading_tables_never_touches_the_network_or_tiktokens_cache(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_LOAD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"o200k_base": 2, "cl100k_base": 2}
    assert list(cache.iterdir()) == []


async def test_loading_off_the_event_loop_keeps_the_loop_free() -> None:
    tokenizer = await asyncio.to_thread(load_tokenizer, "cl100k_base")
    assert tokenizer.count("hello world") == 2


# -- prompt estimate ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def o200k(bpe: dict[str, BpeTokenizer]) -> Tokenizer:
    return bpe["o200k_base"]


class CountingEncoding:
    """The real encoding underneath, counting the encodes asked of it."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.calls += 1
        ids: list[int] = self.real.encode_ordinary(text)
        return ids


def test_a_long_text_seen_before_is_counted_without_encoding_it_again(
    bpe: dict[str, BpeTokenizer],
) -> None:
    """Every turn of a chat sends the conversation again: its earlier messages are not
    encoded again for the prompt estimate."""
    real = bpe["o200k_base"].encoding
    encoding = CountingEncoding(real)
    tokenizer = BpeTokenizer("o200k_base", encoding)  # type: ignore[arg-type]
    history = "Earlier in this conversation: the quick brown fox. " * 200
    resent = history[:-1] + history[-1:]  # equal text, another object, as the next request's
    assert resent is not history
    assert tokenizer.count(history) == tokenizer.count(resent) == len(real.encode(history))
    assert encoding.calls == 1
    other = history[:-1] + "?"  # the same length, another text
    assert tokenizer.count(other) == len(real.encode(other))
    assert encoding.calls == 2


def test_the_long_text_counts_keep_no_text(bpe: dict[str, BpeTokenizer]) -> None:
    tokenizer = BpeTokenizer("o200k_base", bpe["o200k_base"].encoding)
    prompt = "a prompt the gateway must not hold on to " * 20
    references = sys.getrefcount(prompt)
    tokenizer.count(prompt)
    assert sys.getrefcount(prompt) == references


def test_chat_prompt_counts_openais_message_overhead(o200k: Tokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "hello world"}]}
    # 3 per message + "user" (1) + "hello world" (2) + 3 priming the reply
    assert estimate_prompt_tokens(body, o200k) == 9


def test_chat_prompt_counts_names_parts_and_tool_calls(o200k: Tokenizer) -> None:
    base = estimate_prompt_tokens({"messages": [{"role": "user", "content": "hi"}]}, o200k)
    named = {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    assert estimate_prompt_tokens(named, o200k) == base + o200k.count("bob") + 1
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                    {"type": "text", "text": "hello world"},
                ],
            }
        ]
    }
    assert estimate_prompt_tokens(parts, o200k) == base + 2
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    with_call = {"messages": [{"role": "user", "content": "hi", "tool_calls": [call]}]}
    extra = o200k.count("get_weather") + o200k.count('{"city":"Oslo"}')
    assert estimate_prompt_tokens(with_call, o200k) == base + extra


def test_completion_prompt_and_embedding_input(o200k: Tokenizer) -> None:
    assert estimate_prompt_tokens({"prompt": "hello world"}, o200k) == 2
    assert estimate_prompt_tokens({"prompt": ["hello world", "hello"]}, o200k) == 3
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}, o200k) == 3
    assert estimate_prompt_tokens({"input": [[1, 2], [3]]}, o200k) == 3
    assert estimate_prompt_tokens({"input": ["hello world", "hello world"]}, o200k) == 4


def test_tools_sent_to_the_model_count_toward_the_prompt(o200k: Tokenizer) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert estimate_prompt_tokens({**body, "tools": tools}, o200k) > estimate_prompt_tokens(
        body, o200k
    )


def test_chunks_tokenizer_estimates_prompts_by_characters() -> None:
    body = {"prompt": "x" * 40}
    assert estimate_prompt_tokens(body, load_tokenizer("chunks")) == 10
    assert estimate_prompt_tokens(body, load_tokenizer("chars")) == 10


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(["messages", "prompt", "input", "tools", "content", "role", "tool_calls"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _json | st.lists(st.dictionaries(_keys, _json)), max_size=4))
def test_prompt_estimate_never_raises_on_odd_bodies(body: dict[str, Any]) -> None:
    assert estimate_prompt_tokens(body, load_tokenizer("chars")) >= 0


def test_responses_prompt_counts_instructions_and_input_text(o200k: Tokenizer) -> None:
    """A string input is its text; items are messages (their text parts: images and files
    are skipped), tool calls and tool outputs, each with a message's framing; instructions
    are one more message."""
    assert estimate_prompt_tokens({"input": "hello world"}, o200k) == 2
    items: dict[str, Any] = {
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hello world"},
                    {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 4000},
                    {"type": "input_file", "file_data": "B" * 4000, "filename": "a.pdf"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
    }
    texts = ["Be brief.", "hello world", "hello", "get_weather", "{}", "sunny"]
    framing = 3 + 3 * (4 + 1)  # the reply's priming, then four items and the instructions
    expected = sum(o200k.count(text) for text in texts) + framing
    assert estimate_prompt_tokens(items, o200k) == expected


def test_max_output_tokens_is_the_responses_reservation() -> None:
    from gateway.admission import _max_tokens

    assert _max_tokens({"max_output_tokens": 300}, 4096) == 300
    assert _max_tokens({"input": "hi"}, 4096) == 4096
