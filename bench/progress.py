"""Terminal progress for long sweeps, and a summary of the providers that were skipped and why.

After each benchmark: ``[i/n] group shape provider: median`` (i counts collected tests, skipped ones included).
At the end: one line per (provider, reason) among skipped tests, with how many tests it covers.
"""
from collections import Counter

import pytest


def fmt_seconds(t: float) -> str:
    return f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


class Progress:
    def __init__(self, config):
        self.config = config
        self.index = {}
        self.pending = {}  # nodeid -> progress line, written after pytest's own report of that test
        self.skips = Counter()

    def pytest_collection_finish(self, session):
        self.index = {item.nodeid: i for i, item in enumerate(session.items, 1)}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        callspec = getattr(item, "callspec", None)
        provider = callspec.params.get("provider") if callspec else None
        if report.skipped and isinstance(report.longrepr, tuple):
            self.skips[(provider or "-", report.longrepr[2].removeprefix("Skipped: "))] += 1
        elif report.when == "call" and report.passed:
            bench = item.funcargs.get("benchmark")
            if getattr(bench, "stats", None) is not None:  # None under --benchmark-disable
                info = bench.extra_info
                words = [bench.group, "x".join(map(str, info.get("shape", ()))), info.get("provider", "")]
                self.pending[item.nodeid] = (f"[{self.index.get(item.nodeid, '?')}/{len(self.index)}] "
                                             + " ".join(w for w in words if w)
                                             + f": {fmt_seconds(bench.stats.stats.median)}")
        return report

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        line = self.pending.pop(report.nodeid, None)
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if line and terminal:
            terminal.write_line(line)

    def pytest_terminal_summary(self, terminalreporter):
        if not self.skips:
            return
        terminalreporter.section("skipped providers")
        for (provider, reason), count in sorted(self.skips.items()):
            terminalreporter.write_line(f"{provider} ({count} test{'s' if count > 1 else ''}): {reason}")
