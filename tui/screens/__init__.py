"""Screens pushed over the tabs, one per file."""
