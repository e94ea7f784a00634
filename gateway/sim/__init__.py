"""The upstream simulator: an OpenAI-compatible server that tests and benchmarks steer.

`python -m gateway.sim --port P` serves it alone; the gateway starts it in-process for the
`sim` upstream (`start_sim`). Answers to `POST /v1/chat/completions` and `/v1/completions`,
streamed (`"stream": true`, OpenAI's exact chunks, `[DONE]`, the `include_usage` chunk) or
whole; `POST /v1/responses` streamed (typed `event:` frames, see responses.py) or whole, kept
for `GET /v1/responses/{id}` and `previous_response_id`; `POST /v1/embeddings` and
`GET /v1/models` (sim-small, sim-large, sim-reasoning) answer small fixed shapes.

Each request can steer its answer with a body field `"sim": {...}` (OpenAI SDK:
`extra_body={"sim": {...}}`) or the same JSON in an `x-sim` header:

    chunks            content chunks (default SimDefaults.chunks; with `text`, its own count)
    ttft_ms           delay after the headers, before the first event
    headers_delay_ms  delay before the response headers
    delay_ms          delay between token chunks
    text              the content, cut into word-ish pieces, cycled or trimmed to `chunks`
    reasoning_chunks  this many `delta.reasoning_content` chunks before the content
    think             reasoning as `<think>`, pieces, `</think>` chunks inside the content
    finish_reason     default "stop" ("tool_calls" with a tool call)
    status            answer this 4xx/5xx with an OpenAI-shaped error (+ Retry-After: retry_after)
    fault, fail_after see steering.Fault; mid-stream faults strike after `fail_after` token chunks
    big_bytes         the data line size of the `big_line` fault (default 2 MiB)
    tool_call         {"name", "arguments"}: the answer ends in a function call, its arguments
                      in pieces (chat: `delta.tool_calls`, finish "tool_calls"; Responses: a
                      `function_call` item)
    cached_tokens     Responses usage: this many input tokens were cached

Usage is what the gateway counts with its default tokenizer (o200k_base): each chunk's count,
summed (content, reasoning, tool arguments, think tags included); prompt tokens are the
gateway's own prompt estimate (gateway.tokens.estimate_prompt_tokens), see answers.py.
What the simulator received and its connection counts are on `app[SIM_STATE]` (state.py).
"""

from .server import (
    SIM_DEFAULTS,
    RunningSim,
    create_sim_app,
    running_sim,
    start_sim,
)
from .state import SIM_STATE, RecordedRequest, SimState
from .steering import DEFAULT_TEXT, SimDefaults, Steer

__all__ = [
    "DEFAULT_TEXT",
    "SIM_DEFAULTS",
    "SIM_STATE",
    "RecordedRequest",
    "RunningSim",
    "SimDefaults",
    "SimState",
    "Steer",
    "create_sim_app",
    "running_sim",
    "start_sim",
]
