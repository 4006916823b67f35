"""Errors and file handling shared by every layer."""
