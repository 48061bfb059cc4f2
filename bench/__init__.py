"""Benchmarks (pytest-benchmark): ``pytest bench``. ``python -m bench.report RESULTS.json`` makes tables."""
