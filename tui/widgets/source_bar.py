"""A one-line bar split by where bytes came from: 'LAN 72% · OSS 25% · ModelScope 3%'."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from agent.progress import SOURCE_LABELS

COLOURS = {"lan": "green", "oss": "dodger_blue2", "modelscope": "dark_orange", "local": "grey50",
           "missing": "grey30"}


def source_text(by_source: dict[str, int], width: int = 30) -> Text:
    total = sum(by_source.values())
    text = Text()
    if not total:
        return text.append("░" * width, style=COLOURS["missing"])
    parts = sorted(by_source.items(), key=lambda kv: -kv[1])
    used = 0
    for i, (source, n) in enumerate(parts):
        cells = width - used if i == len(parts) - 1 else round(width * n / total)
        text.append("█" * cells, style=COLOURS.get(source, "white"))
        used += cells
    text.append("  " + " · ".join(f"{SOURCE_LABELS.get(k, k)} {100 * v / total:.0f}%" for k, v in parts))
    return text


class SourceBar(Static):
    def show(self, by_source: dict[str, int]) -> None:
        self.update(source_text(by_source))
