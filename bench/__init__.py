"""Benchmarks (not tests): ``python -m bench.kernels``; results under bench/results/."""
