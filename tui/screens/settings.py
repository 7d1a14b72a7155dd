"""Settings: change the agent's download/upload caps and upload slots at run time, and see
the caps in force now (a rule of the rate schedule, ``agent.schedule``, or the settings)."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

KEYS = [("download_rate", "Download cap (e.g. 50MB, 0 = none)"), ("upload_rate", "Upload cap"),
        ("upload_slots", "Upload slots")]


def caps_line(caps: dict) -> str:
    """The caps in force (``status``'s ``caps``) in one line, and which rule set them."""
    from agent.progress import human_bytes
    shown = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v) + '/s' if v else 'unlimited'}"
                      for k, v in caps.items() if k != "rule")
    whence = f"the rate schedule's rule {caps['rule']}" if caps.get("rule") else "the settings"
    return f"In force now: {shown} ({whence})"


class SettingsScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss_settings", "Close")]

    def __init__(self, status: dict):
        super().__init__()
        self.status = status

    def compose(self) -> ComposeResult:
        with Vertical(id="settings-form"):
            yield Label("Agent limits (until it restarts; the config file keeps them)")
            with Grid(id="settings-grid"):
                for key, label in KEYS:
                    yield Label(label)
                    value = self.status.get(key)
                    yield Input(value="0" if value is None else str(value), id=f"set-{key}")
            if self.status.get("caps"):
                yield Static(caps_line(self.status["caps"]), id="settings-caps")
            yield Static("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="settings-apply")
                yield Button("Close", id="settings-close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "settings-close":
            self.dismiss(None)
        else:
            self.apply({key: self.query_one(f"#set-{key}", Input).value for key, _ in KEYS})

    @work(thread=True, exclusive=True)
    def apply(self, values: dict) -> None:
        try:
            for key, value in values.items():
                self.app.link.call("config_set", {"key": key, "value": value})
        except Exception as e:
            self.app.call_from_thread(self.query_one("#settings-error", Static).update, f"⚠ {e}")
            return
        self.app.call_from_thread(self.dismiss, values)

    def action_dismiss_settings(self) -> None:
        self.dismiss(None)
