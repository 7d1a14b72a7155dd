"""A map of a file's chunks, one cell each, coloured by the source that supplied it."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from agent.sources import registry


def chunk_text(files: list[dict], width: int = 64) -> Text:
    text = Text()
    for f in files:
        text.append(f"{f['path']}\n", style="bold")
        chunks = f["chunks"] or []
        for i, source in enumerate(chunks):
            text.append("■", style=registry.colour(source) if source else registry.MISSING_COLOUR)
            if (i + 1) % width == 0:
                text.append("\n")
        if not chunks:
            text.append("(empty file)", style="dim")
        text.append("\n")
    text.append("\n")
    for kind in registry.KINDS:
        text.append("■ ", style=kind.colour).append(f"{kind.short}  ")
    text.append("■ ", style=registry.MISSING_COLOUR).append("missing")
    return text


class ChunkMap(Static):
    def show(self, files: list[dict]) -> None:
        self.update(chunk_text(files))
