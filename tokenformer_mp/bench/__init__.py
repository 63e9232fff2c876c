"""Benchmarks: each figure is a ratio measured side by side in one run, so a noisy machine does not mislead."""
