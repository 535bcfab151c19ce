"""Keeps the fast tier honest: a test that trains a model or starts a process must be marked ``slow``.

``make test-fast`` runs ``-m "not slow"``: the tests that neither train nor spawn, the inner
loop while changing code. Instead of trusting marks written by hand, every run (fast or full)
watches what each unmarked test does during its set-up and its call: a
``transformers.Trainer.train`` (SFT, DPO and TRL's trainers all go through it), a
``subprocess.Popen`` (torchrun, pyflyte, the llama.cpp converter, Chromium) or a
``multiprocessing`` process start fails that test with the fix. A module-scoped fixture that
trains is charged to the first test that sets it up, which is why whole modules carry the mark.

``TEST_TIER_REPORT=path.json`` writes what each test did and how long it took, for re-deriving
the marks (see the README's fast tier).
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import subprocess
import time

import pytest

_events: list[str] = []
_POPEN_INIT = subprocess.Popen.__init__
_report: dict[str, dict] = {}


# probes libraries run once on first use, in milliseconds: platform.architecture() runs `file` (croniter's
# import does), lm_eval asks `git` for its version; charging them to whichever test came first would be noise
PROBES = {"file", "uname", "git", "ldconfig", "lscpu"}


def _program(args, kwargs) -> str:
    cmd = args[1] if len(args) > 1 else kwargs.get("args", "")
    first = cmd if isinstance(cmd, (str, bytes, os.PathLike)) else (cmd[0] if cmd else "")
    return os.path.basename(str(first).split()[0]) if str(first).strip() else ""


def _watch(name: str, original):
    def wrapper(*args, **kwargs):
        if not (original is _POPEN_INIT and _program(args, kwargs) in PROBES):
            _events.append(name)
        return original(*args, **kwargs)

    wrapper.__wrapped__ = original
    return wrapper


_saved: list = []


def pytest_configure(config):
    patches = [(subprocess.Popen, "__init__", "starts a process"),
               (multiprocessing.process.BaseProcess, "start", "starts a process")]
    import transformers

    patches.append((transformers.Trainer, "train", "trains a model"))
    for owner, attr, what in patches:
        _saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, _watch(what, getattr(owner, attr)))


def pytest_unconfigure(config):
    for owner, attr, original in _saved:
        setattr(owner, attr, original)
    _saved.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _events.clear()
    item._tier_started = time.perf_counter()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    did = sorted(set(_events))
    if os.environ.get("TEST_TIER_REPORT"):
        _report[item.nodeid] = {"did": did, "seconds": round(time.perf_counter() - item._tier_started, 2),
                                "slow": item.get_closest_marker("slow") is not None}
    enforce = not os.environ.get("TEST_TIER_REPORT")  # the report is how the marks are found
    if enforce and did and item.get_closest_marker("slow") is None and item.get_closest_marker("gpu") is None:
        pytest.fail(f"{item.nodeid} {' and '.join(did)} but is not marked slow: add @pytest.mark.slow (or the "
                    "module's pytestmark), so `make test-fast` stays the tier that neither trains nor spawns", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TEST_TIER_REPORT")
    if path and _report:
        with open(path, "w") as f:
            json.dump(_report, f, indent=1, sort_keys=True)
