"""Open a local HTML page in headless Chromium and report what a user would see.

CI installs Debian's chromium (.ci/run). Elsewhere a test that needs it is skipped when
no browser is installed; under CI (env CI set) a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class Rendered:
    dom: str  # the DOM after scripts ran
    console_errors: list[str]  # uncaught exceptions and console.error lines


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI: apt-get install -y chromium")
    pytest.skip("no Chromium installed (apt-get install -y chromium)")


def render(page: Path, budget_ms: int = 10000) -> Rendered:
    exe = browser()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}",
                "--dump-dom", page.resolve().as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if re.search(r"Uncaught|Error|error", line)]
    return Rendered(proc.stdout, errors)
