"""Moved to benchmarks/harness.py (/proc and peak memory); bench_training_speed still imports it from here."""

from benchmarks.harness import reset_peak, status_mib

__all__ = ["reset_peak", "status_mib"]
