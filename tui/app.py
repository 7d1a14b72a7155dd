"""The shoal terminal UI. Talks to the agent only through ``tui.link.AgentLink``.

Every agent call runs in a thread worker; the UI thread only renders. Errors become
notifications with a title, never a traceback on screen.
"""

from __future__ import annotations

import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Header, Input, TabbedContent, TabPane

from agent.manifest import hub_repo, is_dataset
from tui.messages import AgentSnapshot, PullFinished
from tui.screens.chat import ChatScreen
from tui.screens.detail import ModelDetailScreen
from tui.screens.job_detail import JobDetailScreen
from tui.screens.room import RoomScreen
from tui.screens.settings import SettingsScreen
from tui.screens.train_form import TrainFormScreen
from tui.widgets.jobs_pane import JobsPane, job_rows
from tui.widgets.models_pane import ModelsPane, model_rows
from tui.widgets.peers_pane import PeersPane
from tui.widgets.status_bar import StatusBar
from tui.widgets.transfers_pane import TransfersPane

REFRESH = 1.0
MIRROR_REFRESH = 15.0


class ShoalApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "shoal"
    SUB_TITLE = "peer-to-peer model cache"
    AUTO_FOCUS = "#models-table"  # keys act on the table; "/" reaches the filter
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pull", "Pull"),
        Binding("u", "chat", "Chat"),
        Binding("t", "train", "Train"),
        Binding("n", "pin", "Pin"),
        Binding("x", "remove", "Remove"),
        Binding("c", "cancel", "Cancel"),
        Binding("s", "settings", "Settings"),
        Binding("o", "room", "Room"),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("slash", "filter", "Filter", show=False),
        Binding("1", "tab('tab-models')", "Models", show=False),
        Binding("2", "tab('tab-transfers')", "Transfers", show=False),
        Binding("3", "tab('tab-peers')", "Peers", show=False),
        Binding("4", "tab('tab-jobs')", "Jobs", show=False),
    ]

    def __init__(self, link, *, launch_flags: dict | None = None, refresh: float = REFRESH,
                 auto_refresh: bool = True):
        super().__init__()
        self.link = link
        self.launch_flags = launch_flags or {}  # e.g. model_type/template for ms-swift
        self.mode_name = "connecting"
        self.status: dict | None = None
        self.mirror: list[dict] = []
        self._mirror_at = 0.0
        self._refresh = refresh
        self._auto = auto_refresh

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="tabs"):
            with TabPane("Models", id="tab-models"):
                yield ModelsPane(id="models")
            with TabPane("Transfers", id="tab-transfers"):
                yield TransfersPane(id="transfers")
            with TabPane("Peers", id="tab-peers"):
                yield PeersPane(id="peers")
            with TabPane("Jobs", id="tab-jobs"):
                yield JobsPane(id="jobs")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(StatusBar).show(None, self.mode_name)
        if self._auto:
            self.connect()

    # ----------------------------------------------------------------- data

    @work(thread=True, exclusive=True, group="connect")
    def connect(self) -> None:
        try:
            self.mode_name = self.link.connect()
        except Exception as e:
            self.call_from_thread(self.show_error, "Agent unavailable", str(e))
            return
        self.call_from_thread(self.set_interval, self._refresh, self.action_refresh)
        self.call_from_thread(self.action_refresh)

    def action_refresh(self) -> None:
        self.fetch()

    @work(thread=True, exclusive=True, group="fetch")
    def fetch(self) -> None:
        try:
            status = self.link.call("status")
            models = self.link.call("list")
            jobs = self.link.call("jobs")
            mirror = None
            if time.monotonic() - self._mirror_at > MIRROR_REFRESH:
                self._mirror_at = time.monotonic()
                mirror = self.link.call("mirror_models")
        except Exception as e:
            self.call_from_thread(self.show_error, "Agent unavailable", str(e))
            return
        self.post_message(AgentSnapshot(status, models, jobs, mirror))

    def on_agent_snapshot(self, snapshot: AgentSnapshot) -> None:
        self.apply_snapshot(snapshot)

    def apply_snapshot(self, snapshot: AgentSnapshot, now: float | None = None) -> None:
        self.status = snapshot.status
        self._last_models = snapshot.models
        if snapshot.mirror is not None:
            self.mirror = snapshot.mirror
        active = {p["model"] for p in snapshot.status.get("pulls", [])}
        try:
            models_pane = self.query_one(ModelsPane)
        except NoMatches:  # a fetch that was in flight when the app began to close: nothing to show
            return
        models_pane.show(model_rows(snapshot.models, self.mirror, active))
        self.query_one(TransfersPane).show(snapshot.status.get("pulls", []), now)
        self.query_one(JobsPane).show(job_rows(snapshot.jobs))
        self.query_one(PeersPane).show(snapshot.status.get("peers", []))
        self.query_one(StatusBar).show(snapshot.status, self.mode_name)

    def show_error(self, title: str, message: str) -> None:
        self.notify(message, title=title, severity="error", timeout=10)

    # -------------------------------------------------------------- actions

    def _model(self) -> str | None:
        model = self.query_one(ModelsPane).selected()
        if model is None:
            self.notify("Select a model on the Models tab first (or type OWNER/NAME in the filter and press Enter)",
                        title="No model selected", severity="warning")
        return model

    def _tab(self) -> str:
        return self.query_one(TabbedContent).active

    TAB_FOCUS = {"tab-models": "#models-table", "tab-transfers": "#transfers", "tab-peers": "#peers-table",
                 "tab-jobs": "#jobs-table"}

    def show_tab(self, tab: str) -> None:
        """Switch tabs and move the focus there too (TabbedContent follows the focus back
        to a tab whose widget keeps it)."""
        self.query_one(TabbedContent).active = tab
        self.query_one(self.TAB_FOCUS[tab]).focus()

    def action_tab(self, tab: str) -> None:
        self.show_tab(tab)

    def action_filter(self) -> None:
        self.query_one(TabbedContent).active = "tab-models"
        self.query_one("#model-filter", Input).focus()

    def action_pull(self) -> None:
        if (model := self._model()) is not None:
            self.pull(model)

    @on(Input.Submitted, "#model-filter")
    def pull_typed(self, event: Input.Submitted) -> None:
        typed = event.value.strip()
        if "/" in typed:
            self.pull(typed)

    def pull(self, model: str) -> None:
        self.notify(f"pulling {model}", title="Pull started")
        self._pull(model)
        self.show_tab("tab-transfers")

    @work(thread=True, group="pulls")
    def _pull(self, model: str) -> None:
        try:
            result = self.link.call("pull", {"model": model}, timeout=3600)
            self.post_message(PullFinished(model, result, None))
        except Exception as e:
            self.post_message(PullFinished(model, None, str(e)))

    def on_pull_finished(self, message: PullFinished) -> None:
        if message.error:
            self.show_error(f"Pull of {message.model} failed", message.error)
        else:
            self.notify(f"{message.model} is in the cache ({message.result['directory']})", title="Pulled")
        self.action_refresh()

    @on(DataTable.RowSelected, "#models-table")
    def open_detail(self, event: DataTable.RowSelected) -> None:
        self.detail(event.row_key.value)

    @work(thread=True, exclusive=True, group="detail")
    def detail(self, model: str) -> None:
        try:
            detail = self.link.call("model_detail", {"model": model})
        except Exception as e:
            self.call_from_thread(self.show_error, "No detail", str(e))
            return
        self.call_from_thread(self.push_screen, ModelDetailScreen(detail))

    @on(DataTable.RowSelected, "#jobs-table")
    def open_job(self, event: DataTable.RowSelected) -> None:
        self.push_screen(JobDetailScreen(event.row_key.value))

    def _launchable(self, model: str | None, what: str) -> str | None:
        """The selected model, or None (and a word why) when it is a dataset."""
        if model is not None and is_dataset(model):
            self.notify(f"{model} is a dataset: select a model to {what}" +
                        (" (its training form lists the cached datasets)" if what == "train" else ""),
                        title="A dataset is selected", severity="warning")
            return None
        return model

    def action_chat(self) -> None:
        if (model := self._launchable(self._model(), "chat with")) is not None:
            base, _, adapter = model.partition("+lora/")
            adapter = adapter.split("@")[0] or None
            self.push_screen(ChatScreen(base if adapter else model, adapter, self.launch_flags))

    def close_chat(self, session: str) -> None:
        self._call_quietly("chat_close", {"session": session})

    def action_train(self) -> None:
        if (model := self._launchable(self._model(), "train")) is not None:
            def started(job: dict | None) -> None:
                if job:
                    self.notify(f"training job {job['id']} started", title="Training")
                    self.show_tab("tab-jobs")
                    self.action_refresh()
            datasets = [f"{hub_repo(m['model'])[1]}@{m['revision']}" for m in self._models()
                        if is_dataset(m["model"]) and m["state"] == "complete"]
            self.push_screen(TrainFormScreen(model, self.launch_flags, datasets), started)

    def action_pin(self) -> None:
        if (model := self._model()) is not None:
            pinned = next((m.get("pinned") for m in self._models() if f"{m['model']}@{m['revision']}" == model), False)
            self._call_quietly("unpin" if pinned else "pin", {"model": model})

    def _models(self) -> list[dict]:
        return getattr(self, "_last_models", [])

    def action_remove(self) -> None:
        if (model := self._model()) is not None:
            self._call_quietly("remove", {"model": model}, done=f"removed {model}")

    def action_cancel(self) -> None:
        if self._tab() == "tab-jobs":
            job = self.query_one(JobsPane).selected()
            if job:
                self.cancel_job(job)
        else:
            model = self.query_one(TransfersPane).first_model()
            if model:
                self._call_quietly("cancel", {"model": model}, done=f"cancelled the pull of {model}")

    def cancel_job(self, job_id: str) -> None:
        self._call_quietly("job_cancel", {"job": job_id}, done=f"job {job_id} stopped")

    def action_settings(self) -> None:
        if self.status is not None:
            self.push_screen(SettingsScreen(self.status))

    def action_room(self) -> None:
        self.push_screen(RoomScreen())

    @work(thread=True)
    def _call_quietly(self, method: str, params: dict, done: str | None = None) -> None:
        try:
            self.link.call(method, params)
        except Exception as e:
            self.call_from_thread(self.show_error, f"{method} failed", str(e))
            return
        if done:
            self.call_from_thread(self.notify, done, title="Done")
        self.call_from_thread(self.action_refresh)

    def on_unmount(self) -> None:
        self.link.close()


def run_tui(settings, launch_flags: dict | None = None) -> int:
    from tui.link import AgentLink
    ShoalApp(AgentLink(settings), launch_flags=launch_flags).run()
    return 0
