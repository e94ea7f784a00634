"""The external programs the deployment tests run, and a skip when one is not installed.

CI installs Debian's `prometheus` (promtool) and kubectl, so there these tests always run; a
developer machine without them gets a skip that names the missing binary.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def require(binary: str) -> str:
    """The path of `binary`, or skip the test saying which one is missing."""
    path = shutil.which(binary) or (
        f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").is_file() else None
    )
    if path is None:
        pytest.skip(f"{binary} is not installed (CI installs it: Debian prometheus / kubectl)")
    return path


def run(command: Sequence[str], cwd: Path | None = None, timeout_s: float = 60) -> str:
    """Run a command; fail the test with its output unless it exits 0; return stdout+stderr."""
    result = subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output}")
    return output
