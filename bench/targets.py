"""What the bench measures: the upstream reached directly, through nginx, or through the gateway.

Each target knows how to start itself against the bench upstream, which port the load
generator should use, which processes to charge CPU and memory to, and how to stop. nginx and
the gateway get generated configuration in the run's temporary directory.
"""

from __future__ import annotations

import abc
import json
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import procs

REPO = Path(__file__).resolve().parent.parent
NGINX = "/usr/sbin/nginx"
START_TIMEOUT_S = 30.0


class TargetError(Exception):
    """A target could not run: `status` is `unavailable`, `unsupported` or `failed`."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Env:
    """What every target needs to know about the run."""

    workdir: Path
    upstream_port: int
    proxy_cpus: str | None
    nofile: int


class Target(abc.ABC):
    """A way to reach the bench upstream."""

    name: str
    #: the `Authorization: Bearer` key the load generator sends (a gateway with a team)
    api_key: str | None = None

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """Where the load generator connects."""

    @abc.abstractmethod
    def roots(self) -> list[int]:
        """The processes whose trees are the proxy (none for a direct connection)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start and wait until the target accepts traffic; raise `TargetError` if it cannot."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop whatever `start` started; harmless when nothing runs."""

    def restart(self) -> None:
        """A fresh process: memory figures must not inherit an earlier scenario's peak."""
        self.stop()
        self.start()


class Direct(Target):
    """The load generator talks to the upstream itself: the floor every proxy is compared to."""

    name = "direct"

    def __init__(self, env: Env) -> None:
        self._env = env

    @property
    def port(self) -> int:
        return self._env.upstream_port

    def roots(self) -> list[int]:
        return []

    def start(self) -> None:
        """Nothing to start: the upstream is already running."""

    def stop(self) -> None:
        """Nothing to stop."""


class ProcessTarget(Target):
    """A proxy that runs as a child process listening on a port of its own."""

    def __init__(self, env: Env, name: str, cpus: str | None, cwd: Path = REPO) -> None:
        self.name = name
        self._env = env
        self._cpus = cpus
        #: where the process starts: `python -m gateway` runs the checkout found there
        self._cwd = cwd
        self._port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = env.workdir / name
        self._dir.mkdir(parents=True, exist_ok=True)
        self.log = self._dir / "output.log"

    @property
    def port(self) -> int:
        return self._port

    def roots(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None else []

    def stop(self) -> None:
        if self._proc is not None:
            procs.stop(self._proc)
            self._proc = None

    def start(self) -> None:
        self._port = procs.free_port()
        with self.log.open("ab") as log:
            self._proc = procs.spawn(
                self.command(), self._cpus, stdout=log, stderr=subprocess.STDOUT, cwd=self._cwd
            )
        if not self.ready(self._proc):
            self.stop()
            raise self.failure(procs.tail(self.log))

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line, after writing any configuration it needs."""

    @abc.abstractmethod
    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Wait until the process serves."""

    def failure(self, log_tail: str) -> TargetError:
        """Why the process did not come up."""
        return TargetError("failed", f"{self.name} did not start: {log_tail.strip()[-600:]}")


class Nginx(ProcessTarget):
    """Debian's nginx-light as a streaming reverse proxy, one worker, buffering off."""

    def command(self) -> list[str]:
        if not os.access(NGINX, os.X_OK):
            raise TargetError("unavailable", f"{NGINX} not found (apt-get install nginx-light)")
        conf = self._dir / "nginx.conf"
        conf.write_text(self.config())
        return [NGINX, "-p", str(self._dir), "-c", str(conf), "-e", str(self._dir / "error.log")]

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return procs.wait_for_port(self._port, proc, START_TIMEOUT_S)

    def config(self) -> str:
        """nginx.conf: the settings a careful operator uses to proxy SSE without buffering."""
        d = self._dir
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"  {kind}_temp_path {d}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""{user}
worker_processes 1;
worker_rlimit_nofile {self._env.nofile};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {self._env.nofile}; }}
http {{
  access_log {d}/access.log combined buffer=64k flush=1s;
{temp}
  keepalive_requests 1000000;
  upstream bench {{
    server 127.0.0.1:{self._env.upstream_port};
    keepalive 1024;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{self._port} backlog=4096;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
"""


class BareRelay(ProcessTarget):
    """`python -m bench.bare_relay`: an aiohttp server relaying with an aiohttp client."""

    def command(self) -> list[str]:
        upstream = f"http://127.0.0.1:{self._env.upstream_port}"
        return [sys.executable, "-m", "bench.bare_relay", "--port", str(self._port),
                "--upstream", upstream]  # fmt: skip

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return procs.wait_for_port(self._port, proc, START_TIMEOUT_S)


#: the bench team's key, and limits no bench load reaches: they are checked, never hit
TEAM_KEY = "bench-team-key"
TEAM_LIMITS = {"requests_per_minute": 100_000_000, "tokens_per_minute": 10_000_000_000}
#: budgets and a price the bench never reaches: charged and stored, never refusing
TEAM_BUDGETS = {"tokens_per_day": 10**15, "usd_per_month": 10**9}
PRICE = {"models": ["bench-*"], "input": 0.5, "cached_input": 0.25, "output": 1.5}


class Gateway(ProcessTarget):
    """`python -m gateway`, with accounting on or off, one or more workers; with `team`, one
    team whose key every request carries and whose request and token limits are checked; with
    `budget` as well, that team has day and month budgets and the model a price. `cwd`: the
    checkout to run (another commit's work tree, for an A/B run in one bench)."""

    def __init__(
        self,
        env: Env,
        name: str,
        cpus: str | None,
        *,
        accounting: bool,
        workers: int = 1,
        team: bool = False,
        budget: bool = False,
        cwd: Path = REPO,
    ) -> None:
        super().__init__(env, name, cpus, cwd)
        self._accounting = accounting
        self._workers = workers
        self._team = team or budget
        self._budget = budget
        self.api_key = TEAM_KEY if self._team else None

    def command(self) -> list[str]:
        conf = self._dir / "gateway.yaml"
        conf.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        command = [sys.executable, "-m", "gateway", "--config", str(conf), "--log-format", "json"]
        return command + (["--workers", str(self._workers)] if self._workers != 1 else [])

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return procs.http_ready(self._port, "/readyz", proc, START_TIMEOUT_S)

    def config(self) -> dict[str, object]:
        """The gateway's configuration: one upstream, one route, generous limits; auth only
        with `team`."""
        route: dict[str, object] = {
            "models": ["bench-*"],
            "upstreams": ["bench"],
            "tokenizer": "o200k_base",
        }
        if not self._accounting:
            route["accounting"] = False
        upstream = f"http://127.0.0.1:{self._env.upstream_port}/v1"
        team: dict[str, object] = {"name": "bench", "keys": [TEAM_KEY], "limits": TEAM_LIMITS}
        priced: dict[str, object] = {}
        if self._budget:
            team["budgets"] = TEAM_BUDGETS
            state_file = str(self._dir / "state.db")
            priced = {
                "pricing": [PRICE],
                "limits": {"max_inflight": 20000, "state_file": state_file},
            }
        teams = [team]
        return (
            {
                "listen": {"host": "127.0.0.1", "port": self._port},
                "shutdown_grace_s": 5,
                "upstreams": {
                    "bench": {
                        "base_url": upstream,
                        "max_connections": 20000,
                        "read_idle_timeout_s": 60,
                    }
                },
                "routes": [route],
                "limits": {"max_inflight": 20000},
            }
            | ({"teams": teams} if self._team else {})
            | priced
        )

    def failure(self, log_tail: str) -> TargetError:
        if not self._accounting and "accounting" in log_tail:
            return TargetError("unsupported", "the gateway rejects `accounting: false` on a route")
        return super().failure(log_tail)


def gateway_available() -> str | None:
    """None if `python -m gateway --help` works here, else why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--help"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "python -m gateway --help did not finish in 60 s"
    if done.returncode != 0:
        return "python -m gateway --help failed: " + done.stderr.decode(errors="replace")[-300:]
    return None
