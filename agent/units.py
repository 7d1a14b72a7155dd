"""Sizes as people write them ("50GB", "10MB/s", "unlimited") in settings and commands. Pure."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4,
          "tb": 1000 ** 4, "tib": 1024 ** 4}


def parse_size(value: object) -> int | None:
    """'50GB', '20GiB', '10MB/s', '1500000' -> bytes; 0, '', 'none', 'unlimited' -> None."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)(?:/s)?\s*", str(value))
        if str(value).strip().lower() in ("", "none", "unlimited", "off"):
            return None
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(value)
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if number < 0:
        raise ValueError(value)
    return int(number) or None
