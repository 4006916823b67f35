"""Experiments: plans, methods, seeds, run caching by content, statistics across seeds, reports; the demo is one plan."""
