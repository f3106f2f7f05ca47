"""Benchmarks: run from the repo root as `python -m bench.<name>`; each prints ratios against a reference."""
