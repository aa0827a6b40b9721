"""Benchmarks: offline throughput on the in-process engine (MindIE CSV and serving benchmarks come later)."""
