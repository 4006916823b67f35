"""Benchmarks: each script prints a table and writes JSON. `python -m benchmarks` runs them all."""
