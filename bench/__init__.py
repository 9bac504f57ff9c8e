"""Benchmarks of cdp-activation: each prints its figures and writes them to bench/results.md.

Run from the repository root: `python -m bench` (all), `python -m bench audience --sizes 1000000`.
Generated warehouses go to bench/data/ (git-ignored) and are reused when their size matches.
"""
