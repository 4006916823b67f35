"""Experiments: longer runs than the demo, each a command that writes its own report."""
