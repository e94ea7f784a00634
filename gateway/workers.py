"""`--workers N`: N processes sharing the listening port through SO_REUSEPORT.

The kernel spreads new connections across the processes. Metrics stay correct across them
through prometheus-client's multiprocess mode: every worker writes its samples to files in a
directory this parent creates, and `/metrics` in any worker aggregates all of them (gauges of
live streams are summed over the live workers). Limits are shared correctly only with
`limits.backend: redis`; with the local backend each worker enforces the team limits on its own
share of the traffic (documented in the README).

SIGTERM or SIGINT to the parent is forwarded to every worker, each drains as a single process
does, and the parent exits 0 once all have stopped. SIGHUP is forwarded too: each worker
reloads the configuration file on its own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from types import FrameType

from .config import Settings
from .logs import LogFormat

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run_workers(
    settings: Settings, count: int, log_format: LogFormat, config_path: str | None = None
) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir
        spawn = multiprocessing.get_context("spawn")
        procs = [
            spawn.Process(target=_worker, args=(settings, log_format, metrics_dir, config_path))
            for _ in range(count)
        ]
        for proc in procs:
            proc.start()

        def forward(signum: int, frame: FrameType | None) -> None:
            sent = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
            for proc in procs:
                if proc.pid is not None and proc.is_alive():
                    os.kill(proc.pid, sent)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        for proc in procs:
            proc.join()
        failed = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
        return 1 if failed else 0


def _worker(
    settings: Settings, log_format: LogFormat, metrics_dir: str, config_path: str | None
) -> None:
    """One worker process: its own loop, its own pools, the shared port, shared metrics."""
    from prometheus_client import CollectorRegistry, multiprocess

    from .logs import configure_logging
    from .server import run_loop, serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM drains
    configure_logging(log_format)
    exposition = CollectorRegistry()
    multiprocess.MultiProcessCollector(exposition, path=metrics_dir)  # type: ignore[no-untyped-call]
    try:
        run_loop(serve(settings, reuse_port=True, exposition=exposition, config_path=config_path))
    finally:
        multiprocess.mark_process_dead(os.getpid(), path=metrics_dir)  # type: ignore[no-untyped-call]
