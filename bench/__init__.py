"""Benchmarks for hadw_kernels: `python -m bench --help` (CLI table + JSON), `pytest bench` (pytest-benchmark).

See bench/RESULTS.md for measured numbers and bench/hadw_loss_bench.py for what each provider and byte count is.
"""
