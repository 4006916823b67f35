"""Test helpers (tiny models and tokenizers); no runtime module imports this package."""
