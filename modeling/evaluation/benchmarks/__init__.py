"""Benchmark measurements, one module per benchmark (`long_context`, ...), run by the `scripts/bench_*.py` commands.

Import the module you need; this package imports none of them (a measurement module also runs as
`python -m lightarch.evaluation.benchmarks.<name>` in a fresh process, and must not be imported twice).
"""
