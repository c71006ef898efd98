"""Benchmarks: ``python -m benchmarks.<name>``; never imported by the tests."""
