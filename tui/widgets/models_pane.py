"""The Models tab: every model and dataset shoal knows (cache, OSS mirror, LAN peers),
filtered as you type (``datasets/`` shows the datasets alone)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Input

from agent.manifest import hub_repo
from agent.progress import human_bytes
from tui.widgets.tables import refill, selected_key

# Most telling first: at 80 columns the right-hand columns scroll.
COLUMNS = ("Name", "Kind", "Complete", "Size", "Where", "Peers", "Pinned", "Revision")


def name_and_kind(model_id: str) -> tuple[str, str]:
    """A row's name and kind: a dataset's id is ``datasets/OWNER/NAME``."""
    kind, repo = hub_repo(model_id)
    return repo, kind


def model_rows(models: list[dict], mirror: list[dict], active: set[str]) -> list[tuple[str, tuple]]:
    """(key, row) for the table: cached models and datasets first, then mirror-only ones.
    The key is the entry's full id (``datasets/OWNER/NAME@REV`` for a dataset)."""
    rows, cached = [], set()
    for m in models:
        key = f"{m['model']}@{m['revision']}"
        cached.add(key)
        pct = 100.0 * m["have"] / m["size"] if m["size"] else 100.0
        where = "cache+mirror" if any(f"{x['model']}@{x['revision']}" == key for x in mirror) else "cache"
        state = "pulling" if key in active else f"{pct:.0f}%"
        rows.append((key, (*name_and_kind(m["model"]), state, human_bytes(m["size"]), where, "0",
                           "yes" if m.get("pinned") else "", m["revision"])))
    for x in mirror:
        key = f"{x['model']}@{x['revision']}"
        if key not in cached:
            rows.append((key, (*name_and_kind(x["model"]), "pulling" if key in active else "-", "-", "mirror",
                               "0", "", x["revision"])))
    return rows


class ModelsPane(Vertical):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._rows: list[tuple[str, tuple]] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="/ to filter (datasets/ for datasets); OWNER/NAME or datasets/OWNER/NAME "
                                "and Enter pulls one not listed",
                    id="model-filter")
        table = DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table

    def show(self, rows: list[tuple[str, tuple]]) -> None:
        self._rows = rows
        self._refill()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._refill()

    def on_key(self, event) -> None:
        if event.key == "escape" and isinstance(self.app.focused, Input):
            self.query_one(DataTable).focus()
            event.stop()

    def _refill(self) -> None:
        wanted = self.query_one(Input).value.strip().lower()
        refill(self.query_one(DataTable), [(key, row) for key, row in self._rows
                                          if not wanted or wanted in key.lower()])

    def selected(self) -> str | None:
        return selected_key(self.query_one(DataTable))
