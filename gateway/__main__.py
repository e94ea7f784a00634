"""`python -m gateway`: parse the command line, load settings, configure logging, run."""

from __future__ import annotations

import argparse
import sys

import msgspec

from .config import ConfigError, Listen, Settings, default_settings, load_settings
from .logs import configure_logging
from .server import run_loop, serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--config", help="YAML file (default: built-in defaults, simulator)")
    parser.add_argument("--host", help="listen address (overrides the file)")
    parser.add_argument("--port", type=int, help="listen port (overrides the file)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--log-format", choices=["json", "console"], default="json")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config) if args.config else default_settings()
    listen = Listen(
        host=args.host or settings.listen.host,
        port=args.port if args.port is not None else settings.listen.port,
    )
    return msgspec.structs.replace(settings, listen=listen)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_format)
    if args.workers > 1:
        from .workers import run_workers

        return run_workers(settings, args.workers, args.log_format, args.config)
    run_loop(serve(settings, config_path=args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
