"""HTTP ``Range`` header parsing shared by the gateway and the test servers. Pure."""

from __future__ import annotations

import re


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end_inclusive) of a single ``bytes=`` range, or None for the whole body.

    Raises ``ValueError`` for a range that cannot be satisfied (416).
    """
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    end = min(end, size - 1)
    if start > end:
        raise ValueError("unsatisfiable range")
    return start, end
