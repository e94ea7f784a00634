"""`python -m bench`: the benchmark's entry point (see bench/README.md)."""

from bench.cli import main

raise SystemExit(main())
