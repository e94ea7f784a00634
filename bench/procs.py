"""Child processes of a bench run: starting them pinned, reading their cost, stopping them.

CPU and memory come from `/proc/<pid>/stat` of the process and every live descendant (nginx's
work happens in its worker, a gateway with `--workers N` in its children), so a target's cost
is the whole tree it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds (user + system) and resident bytes of a process tree at one moment."""

    cpu_s: float
    rss_bytes: int
    at: float
    cpu_s_by_pid: tuple[tuple[int, float], ...] = ()
    #: the user-space part of `cpu_s`: the rest is the kernel's work for the process
    user_s: float = 0.0

    def cores_since(self, earlier: Usage) -> float:
        """Average number of cores busy between two readings."""
        return (self.cpu_s - earlier.cpu_s) / max(1e-9, self.at - earlier.at)

    def cores_by_pid_since(self, earlier: Usage) -> list[float]:
        """Cores each process kept busy between two readings, busiest first.

        With several workers this shows whether the kernel spread connections among them.
        """
        before = dict(earlier.cpu_s_by_pid)
        elapsed = max(1e-9, self.at - earlier.at)
        cores = [(cpu - before.get(pid, 0.0)) / elapsed for pid, cpu in self.cpu_s_by_pid]
        return sorted((round(c, 3) for c in cores), reverse=True)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after `comm` in /proc/<pid>/stat (None if the process is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rpartition(")")[2].split()


def tree(roots: Iterable[int]) -> list[int]:
    """`roots` and every live process below them.

    Scanning /proc takes milliseconds, so callers find the tree once per measurement and
    read only its processes while the load runs.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def usage(pids: Iterable[int]) -> Usage:
    """CPU and RSS summed over `pids` (processes that have gone count nothing)."""
    by_pid: list[tuple[int, float]] = []
    rss_pages = user_ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            by_pid.append((pid, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS))
            user_ticks += int(fields[11])
            rss_pages += int(fields[21])
    cpu_s = sum(cpu for _, cpu in by_pid)
    return Usage(
        cpu_s, rss_pages * PAGE_BYTES, time.monotonic(), tuple(by_pid), user_ticks / CLOCK_TICKS
    )


def cpu_busy_s(cpus: Iterable[int]) -> float:
    """Seconds the given CPUs spent on anything but idle and iowait, from /proc/stat.

    Compared with the proxy's own CPU time over the same window, it shows how much of the
    proxy's core other processes took: on a shared machine that is the first thing to check.
    """
    wanted = {f"cpu{c}" for c in cpus}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS


def cpu_list(spec: str | None) -> tuple[int, ...]:
    """CPUs of a taskset list such as `1` or `0,1` or `2-3` (empty when unpinned)."""
    cpus: list[int] = []
    for part in (spec or "").split(","):
        if "-" in part:
            low, high = part.split("-")
            cpus += range(int(low), int(high) + 1)
        elif part:
            cpus.append(int(part))
    return tuple(cpus)


def free_port() -> int:
    """A loopback port free right now (the target binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix `command` with `taskset -c CPUS` when pinning is on."""
    return ["taskset", "-c", cpus, *command] if cpus else list(command)


def spawn(
    command: Sequence[str],
    cpus: str | None,
    *,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session, so stopping it can reach its whole group."""
    return subprocess.Popen(
        pinned(command, cpus), stdout=stdout, stderr=stderr, cwd=cwd, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL the child's process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: also ends orphaned workers
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll until something accepts on `port`; False if `proc` died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def http_ready(port: int, path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll `GET path` until it answers 200; False if `proc` died or time ran out."""
    deadline = time.monotonic() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(request)
            if s.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                return True
        time.sleep(0.1)
    return False


def tail(path: Path, limit: int = 2000) -> str:
    """The end of a log file, for an error message."""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except FileNotFoundError:
        return ""
