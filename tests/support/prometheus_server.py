"""A real Prometheus server for tests: started on a free loopback port, scraping given targets.

Tests that check what a dashboard or a rule will show should ask the real query engine, not a
regex: this starts the Debian `prometheus` binary with a temporary storage directory and a
generated configuration (1 s scrape and rule evaluation, so data appears within seconds),
waits until it is ready, and stops it. Everything here blocks: call it from synchronous
fixtures and tests, never from a running event loop.

    with running_prometheus(["127.0.0.1:8080"], rule_files=[...], workdir=tmp) as prom:
        prom.query('sum(rate(gateway_tokens_total[1m])) by (team)')
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS_BINARY = "/usr/bin/prometheus"


class PrometheusError(Exception):
    """Prometheus did not start, or answered a query with an error."""


def prometheus_binary() -> str | None:
    """The prometheus binary to run, or None when it is not installed."""
    if Path(PROMETHEUS_BINARY).is_file():
        return PROMETHEUS_BINARY
    return shutil.which("prometheus")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(
    path: Path,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
) -> None:
    """A configuration that scrapes `targets` (host:port, /metrics) as job `gateway`."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "gateway",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@dataclass(slots=True)
class PrometheusServer:
    """A running Prometheus process and the HTTP API to query it."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET an API path; return the decoded `data` of a successful answer."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(self.url + path + query, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the parse error as JSON
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; return the result vector (empty when no data)."""
        data = self.get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's `label_values(match, label)` variable query lists."""
        values: list[str] = self.get(f"/api/v1/label/{label}/values", {"match[]": match})
        return values

    def log(self) -> str:
        """The server's own output, for failure messages."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited early:\n{self.log()[-4000:]}")
            if self._answers_ready():
                return
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def _answers_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s; always reaps the process."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_prometheus(
    targets: Sequence[str],
    workdir: Path,
    rule_files: Sequence[Path] = (),
    binary: str | None = None,
) -> PrometheusServer:
    """Start Prometheus scraping `targets`; its config, data and log live under `workdir`."""
    binary = binary or prometheus_binary()
    if binary is None:
        raise PrometheusError("no prometheus binary installed")
    config_path = workdir / "prometheus.yml"
    write_config(config_path, targets, rule_files)
    port = free_port()
    log_path = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    return PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[str], workdir: Path, rule_files: Sequence[Path] = ()
) -> Iterator[PrometheusServer]:
    """A ready Prometheus for the duration of the block; stopped on the way out, always."""
    server = start_prometheus(targets, workdir, rule_files)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
