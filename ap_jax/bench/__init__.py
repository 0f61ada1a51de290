"""Benchmark-style scripts: each prints a table and writes JSON (never timed assertions in tests)."""
