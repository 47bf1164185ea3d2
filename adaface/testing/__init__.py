"""Helpers shared by the tests, the benchmarks and the built-in tiny training preset."""
