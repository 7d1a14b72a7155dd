"""Model detail: files with sizes and verification state, the chunk map, peers holding it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from agent.progress import human_bytes
from tui.widgets.chunk_map import ChunkMap


class ModelDetailScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, detail: dict):
        super().__init__()
        self.detail = detail

    def compose(self) -> ComposeResult:
        d = self.detail
        yield Header()
        with VerticalScroll():
            yield Static(f"[b]{d['model']}@{d['revision']}[/b]  {human_bytes(d['size'])}  {d['state']}"
                         f"{'  pinned' if d.get('pinned') else ''}\n{d['dir']}\nmanifest {d.get('manifest_id') or '-'}",
                         id="detail-head")
            table = DataTable(id="detail-files", cursor_type="row")
            table.add_columns("File", "Size", "Verified", "Chunks")
            for f in d["files"]:
                have = sum(1 for c in f["chunks"] if c)
                state = "yes" if f["complete"] else f"{have}/{len(f['chunks'])} chunks"
                table.add_row(f["path"], human_bytes(f["size"]), state, str(len(f["chunks"])))
            yield table
            chunk_map = ChunkMap(id="detail-chunks")
            chunk_map.show(d["files"])
            yield chunk_map
            peers = d.get("peers") or []
            yield Static("Held by peers: " + (", ".join(p["id"][:12] for p in peers) if peers else "none known"),
                         id="detail-peers")
        yield Footer()
