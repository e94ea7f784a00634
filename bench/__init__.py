"""The gateway's benchmark: direct vs nginx vs the gateway, measured side by side in one run.

`python -m bench` (see bench/README.md). Modules, along the data path:
`sse` (the stream both ends agree on), `http1` (framing), `upstream` and `loadgen` (the two
ends, each its own process), `targets` (what sits between them), `procs` (CPU and memory
from /proc), `scenarios` (one measurement each), `report` (ratios, tables, JSON), `cli`.
"""
