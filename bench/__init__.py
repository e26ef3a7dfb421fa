"""Benchmarks for hadw_kernels: `python -m bench --help` (CLI table + JSON), `pytest bench` (pytest-benchmark).

Layout: `bench/harness.py` (timing, bytes, memory, table, JSON; knows no op), one module per op
(`bench/hadw_loss_bench.py`: inputs, the naive baseline, providers, bytes), `bench/__main__.py` (the CLI; `OPS`
lists the ops). Measured numbers: bench/RESULTS.md.
"""
