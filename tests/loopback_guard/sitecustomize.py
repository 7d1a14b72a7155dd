"""Loaded by every Python subprocess the tests start (via PYTHONPATH): loopback only."""

from agent.testing.guard import install

install()
