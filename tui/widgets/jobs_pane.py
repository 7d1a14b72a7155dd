"""The Jobs tab: running and finished jobs (chat, run, serve, train)."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from tui.widgets.tables import refill, selected_key


def job_rows(jobs: list[dict]) -> list[tuple[str, tuple]]:
    rows = []
    for j in sorted(jobs, key=lambda j: -j["created"]):
        detail = j["detail"].get("url") or (f"adapter {j['detail']['adapter']}" if j["detail"].get("adapter") else "")
        rows.append((j["id"], (j["id"], j["kind"], j["model"], j["state"],
                               time.strftime("%H:%M:%S", time.localtime(j["created"])),
                               "" if j["exit_code"] is None else str(j["exit_code"]), detail)))
    return rows


class JobsPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("No jobs yet: on the Models tab, u chats with a model and t trains a LoRA adapter.",
                     id="no-jobs")
        table = DataTable(id="jobs-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("Job", "Kind", "Model", "State", "Started", "Exit", "Detail")
        yield table

    def show(self, rows: list[tuple[str, tuple]]) -> None:
        refill(self.query_one(DataTable), rows)
        self.query_one("#no-jobs").display = not rows

    def selected(self) -> str | None:
        return selected_key(self.query_one(DataTable))
