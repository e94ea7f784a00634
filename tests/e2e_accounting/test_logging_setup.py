"""`python -m gateway --log-format json|console`: configured, one line per request, no access log.

Run as operators run it, in a subprocess: structlog's production setup caches loggers on first
use, so configuring it inside the test process would leave every later test's capture_logs
blind. A sync test (no event loop) starts the process, sends one streamed request with the
SDK, scrapes /metrics (a public path, which logs nothing), stops it with SIGTERM and reads
its output.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: what aiohttp's access logger writes: `"POST /v1/chat/completions HTTP/1.1" 200`
ACCESS_LINE = re.compile(r'"(GET|POST) /\S* HTTP/1\.[01]" \d{3}')
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the gateway did not become ready")


def serve_one_request(fmt: str) -> tuple[str, str]:
    """Run the gateway, send one stream and one scrape, stop it; its (stdout, stderr)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gateway", "--port", str(port), "--log-format", fmt]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(process, url)
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
        stream = sdk.chat.completions.create(
            model="sim-1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"sim": {"chunks": 3, "delay_ms": 0, "ttft_ms": 0}},
        )
        assert len(list(stream)) > 3
        sdk.close()
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            assert b"gateway_tokens_total" in response.read()
        process.terminate()
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, err.decode(errors="replace")
    return out.decode(), err.decode()


def test_json_logs_one_parseable_line_per_request_and_no_access_log() -> None:
    out, err = serve_one_request("json")
    lines = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 1
    assert requests[0]["path"] == "/v1/chat/completions" and requests[0]["status"] == 200
    assert requests[0]["completion_tokens"] == 3
    assert not ACCESS_LINE.search(out + err)


def test_console_logs_one_line_per_request_and_no_access_log() -> None:
    out, err = serve_one_request("console")
    plain = ANSI.sub("", out)
    requests = [line for line in plain.splitlines() if "path=/v1/chat/completions" in line]
    assert len(requests) == 1
    assert re.search(r"\brequest\b", requests[0]) and "completion_tokens=3" in requests[0]
    assert not ACCESS_LINE.search(plain + err)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configure_logging_accepts_each_format_in_a_fresh_process(fmt: str) -> None:
    """configure_logging itself, without the server: no error, a line in the chosen format."""
    code = (
        "import structlog; from gateway.logs import configure_logging;"
        f"configure_logging({fmt!r}); structlog.get_logger('t').info('hello', answer=42)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=30, check=True
    )
    out = ANSI.sub("", done.stdout.decode())
    if fmt == "json":
        assert orjson.loads(out)["answer"] == 42
    else:
        assert "hello" in out and "answer=42" in out


REQUEST_LINE_SCRIPT = """
import sys

import orjson
import structlog
from gateway.logs import REQUEST_ID, configure_logging, request_logger

fmt = {fmt!r}
configure_logging(fmt)
general = structlog.get_logger("gateway")
# the chain configure_logging set up before the request line had its own
stock = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
if fmt == "json":
    stock += [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]
    output = structlog.BytesLogger(sys.stdout.buffer)
else:
    stock.append(structlog.dev.ConsoleRenderer())
    output = structlog.PrintLogger(sys.stdout)
stock_logger = structlog.wrap_logger(output, processors=stock)
token = REQUEST_ID.set("req-1")
general.warning("mid_request", detail=1)
fields = dict(method="POST", path="/v1/x", request_id="req-1", status=200, ttft_ms=None)
request_logger().info("request", **fields)
general.info("request", **fields)
stock_logger.info("request", **fields)
REQUEST_ID.reset(token)
general.info("after_the_request")
"""
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"


def logged_lines(fmt: str) -> list[str]:
    script = REQUEST_LINE_SCRIPT.format(fmt=fmt)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=30, check=True
    )
    return ANSI.sub("", done.stdout.decode()).splitlines()


def without_timestamp(line: str) -> str:
    return re.sub(TIMESTAMP, "<time>", line)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_request_logger_writes_the_line_structlogs_own_processors_write(fmt: str) -> None:
    """The request line's short chain, and the shared chain's merged level and timestamp:
    the same line as structlog's add_log_level and TimeStamper, field for field, in order."""
    _, fast, general, stock, _ = logged_lines(fmt)
    assert without_timestamp(fast) == without_timestamp(general) == without_timestamp(stock)
    if fmt == "json":
        line = orjson.loads(fast)
        assert list(line) == [
            "method", "path", "request_id", "status", "ttft_ms", "event", "level", "timestamp",
        ]  # fmt: skip
        assert re.fullmatch(TIMESTAMP, line["timestamp"]) and line["level"] == "info"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_lines_logged_during_a_request_carry_its_id_and_later_ones_do_not(fmt: str) -> None:
    warning, *_, after = logged_lines(fmt)
    if fmt == "json":
        assert orjson.loads(warning)["request_id"] == "req-1"
        assert orjson.loads(warning)["level"] == "warning"
        assert "request_id" not in orjson.loads(after)
    else:
        assert "request_id=req-1" in warning and "mid_request" in warning
        assert "request_id" not in after
