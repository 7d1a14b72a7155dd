"""A job up close: for training, a live loss plot and the log tail; for others, the log."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Sparkline, Static

REFRESH = 1.0


class JobDetailScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("c", "cancel_job", "Cancel job")]

    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id
        self._log_len = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"Job {self.job_id}", id="job-head")
        yield Static("loss", id="loss-label")
        yield Sparkline([], id="loss-plot")
        yield RichLog(id="job-log", wrap=False, max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_job()
        self.set_interval(REFRESH, self.refresh_job)

    @work(thread=True, exclusive=True)
    def refresh_job(self) -> None:
        try:
            progress = self.app.link.call("job_progress", {"job": self.job_id})
            log = self.app.link.call("job_log", {"job": self.job_id, "bytes": 32 * 1024})["log"]
        except Exception as e:
            self.app.call_from_thread(self.app.show_error, "Job unavailable", str(e))
            return
        self.app.call_from_thread(self._show, progress, log)

    def _show(self, progress: dict, log: str) -> None:
        job, steps = progress["job"], progress["steps"]
        head = f"Job {job['id']}  {job['kind']} {job['model']}  state {job['state']}"
        if steps:
            last = steps[-1]
            head += f"\nstep {last['step']}/{last['max_steps']}  loss {last['loss']:.4f}  ETA {last['remaining'] or '-'}"
        self.query_one("#job-head", Static).update(head)
        self.query_one("#loss-label", Static).display = bool(steps)
        plot = self.query_one(Sparkline)
        plot.display = bool(steps)
        plot.data = [s["loss"] for s in steps]
        text = self.query_one(RichLog)
        text.clear()
        for line in log.splitlines()[-200:]:
            text.write(line)

    def action_cancel_job(self) -> None:
        self.app.cancel_job(self.job_id)
