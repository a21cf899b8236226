"""Benchmarks of coconut_kernels (pytest-benchmark), one module per op."""
