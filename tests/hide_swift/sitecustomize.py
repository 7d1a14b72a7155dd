"""Loaded by test subprocesses that must run as if ms-swift were not installed: any import
of ``swift`` fails as it would on a machine without it. The loopback guard still applies."""

import importlib.abc
import sys

from agent.testing.guard import install

install()


class _HideSwift(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "swift" or name.startswith("swift."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _HideSwift())
