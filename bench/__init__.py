"""Benchmarks: run by hand or by `make bench`; they print numbers, they assert nothing."""
