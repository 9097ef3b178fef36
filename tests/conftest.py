"""Shared test set-up: GPU tests skip cleanly (and say why) without CUDA; each suite has a time budget."""
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (it decorates its own
    # standard library then), and importing vmambax_kernels imports triton through torch.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Seconds of test time each suite (a folder under tests/) may take on CI's 2-core CPU; the whole
# run must stay well inside CI's 90 minutes. A suite over budget fails the run with its total.
# Rebalanced once the kernels' interpreter tests had grown ops to 1069-1148 s of its 1200 (fresh
# clones, 2026-11-28) while models, engine and cli used 37-70 s of 900 each: the sum of the budgets
# went from 80 to 70 minutes.
SUITE_BUDGET_S = {"ops": 1500, "models": 600, "modules": 300, "data": 300, "metrics": 300,
                  "engine": 600, "cli": 600}
DEFAULT_BUDGET_S = 300
_spent = defaultdict(float)


def _suite(item) -> str:
    parts = Path(str(item.fspath)).resolve().parts
    return parts[parts.index("tests") + 1] if "tests" in parts and parts[-2] != "tests" else "tests"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    yield
    _spent[_suite(item)] += time.perf_counter() - start


def pytest_sessionfinish(session, exitstatus):
    over = {s: t for s, t in _spent.items() if t > SUITE_BUDGET_S.get(s, DEFAULT_BUDGET_S)}
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _spent:
        reporter.ensure_newline()
        reporter.write_line("suite times: " + ", ".join(f"{s} {t:.0f}s/{SUITE_BUDGET_S.get(s, DEFAULT_BUDGET_S)}s"
                                                        for s, t in sorted(_spent.items())))
    if over and not torch.cuda.is_available():  # budgets are for CI's CPU run
        if reporter is not None:
            reporter.write_line(f"FAILED: suites over their time budget: {over}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
