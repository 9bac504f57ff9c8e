"""Benchmarks of cdp-activation: each prints its figures, writes its tables to
bench/results_<name>.md (the audience benchmark: bench/results.md) and refreshes the index of
every benchmark at the end of bench/results.md (bench/index.py).

Run from the repository root: `python -m bench` (all), `python -m bench audience --sizes 1000000`.
Generated warehouses go to bench/data/ (git-ignored) and are reused when their size matches.
"""
