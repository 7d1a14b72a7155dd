"""DataTable helpers shared by the panes: refill rows keeping the cursor on the same key."""

from __future__ import annotations

from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist


def selected_key(table: DataTable) -> str | None:
    """The key of the row under the cursor, or None for an empty table."""
    if not table.row_count:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # the cursor is outside the rows (mid-refill)
        return None


def refill(table: DataTable, rows: list[tuple[str, tuple]]) -> None:
    """Replace the rows; the cursor stays on the row it was on, if that row is still there."""
    selected = selected_key(table)
    table.clear()
    for key, row in rows:
        table.add_row(*row, key=key)
    if selected is not None:
        try:
            table.move_cursor(row=table.get_row_index(selected))
        except RowDoesNotExist:
            pass
