"""Correctness tests (run from the repository root: ``pytest tests``)."""
