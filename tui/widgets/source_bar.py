"""A one-line split by where bytes came from: 'LAN 72% · OSS mirror 25% · ModelScope 3%'."""

from __future__ import annotations

from rich.text import Text

from agent.sources import registry


def source_text(by_source: dict[str, int], width: int = 30) -> Text:
    total = sum(by_source.values())
    text = Text()
    if not total:
        return text.append("░" * width, style=registry.MISSING_COLOUR)
    parts = sorted(by_source.items(), key=lambda kv: -kv[1])
    used = 0
    for i, (source, n) in enumerate(parts):
        cells = width - used if i == len(parts) - 1 else round(width * n / total)
        text.append("█" * cells, style=registry.colour(source))
        used += cells
    text.append("  " + " · ".join(f"{registry.short(k)} {100 * v / total:.0f}%" for k, v in parts))
    return text
