"""Adapters out of a run: export, model cards, and the streamed, audited merge."""
