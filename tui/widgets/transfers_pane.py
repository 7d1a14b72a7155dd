"""The Transfers tab: every active pull with progress, speed, ETA, source split, sparkline."""

from __future__ import annotations

import time
from collections import deque

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar, Sparkline, Static

from agent.progress import human_bytes, human_time
from tui.widgets.source_bar import source_text

HISTORY = 60  # samples of speed per transfer


class TransferRow(Vertical):
    def __init__(self, model: str, **kwargs):
        super().__init__(classes="transfer", **kwargs)
        self.model = model
        self.samples: deque = deque(maxlen=HISTORY)
        self.speeds: deque = deque([0.0], maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Label(self.model, classes="transfer-title")
        yield ProgressBar(total=100, show_eta=False, classes="transfer-bar")
        yield Static("", classes="transfer-sources")
        yield Sparkline(list(self.speeds), classes="transfer-speed")

    def show(self, pull: dict, now: float) -> None:
        done = pull["done_bytes"]
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5:
            self.samples.popleft()
        span = self.samples[-1][0] - self.samples[0][0]
        self.speed = (self.samples[-1][1] - self.samples[0][1]) / span if span > 0 else 0.0
        self.speeds.append(self.speed)
        self.pull = pull
        if self.is_mounted and self.children:
            self._paint()

    def on_mount(self) -> None:
        if getattr(self, "pull", None):
            self._paint()

    def _paint(self) -> None:
        pull, speed = self.pull, self.speed
        done, total = pull["done_bytes"], pull["total_bytes"]
        eta = (total - done) / speed if speed > 0 else None
        self.query_one(ProgressBar).update(total=max(total, 1), progress=done)
        text = source_text(pull.get("by_source", {}), width=24)
        text.append(f"\n{human_bytes(done)} of {human_bytes(total)}  {human_bytes(speed)}/s  ETA {human_time(eta)}")
        self.query_one(".transfer-sources", Static).update(text)
        self.query_one(Sparkline).data = list(self.speeds)


class TransfersPane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("No transfers. Pull a model from the Models tab (p).", id="no-transfers")

    def show(self, pulls: list[dict], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        rows = {row.model: row for row in self.query(TransferRow)}
        wanted = {p["model"] for p in pulls}
        for model, row in rows.items():
            if model not in wanted:
                row.remove()
        for pull in pulls:
            row = rows.get(pull["model"])
            if row is None:
                row = TransferRow(pull["model"])
                row.show(pull, now)
                self.mount(row)
            else:
                row.show(pull, now)
        self.query_one("#no-transfers").display = not pulls

    def first_model(self) -> str | None:
        rows = list(self.query(TransferRow))
        return rows[0].model if rows else None
