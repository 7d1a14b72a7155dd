"""Widgets of the shoal UI, one per file."""
