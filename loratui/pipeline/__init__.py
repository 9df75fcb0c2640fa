"""Headless pipeline: config, events, run directories, models and the steps.

Nothing here imports textual or the TUI (checked by import-linter and tests/test_boundaries.py);
heavy libraries (torch, transformers) are imported inside the functions that need them.
"""
