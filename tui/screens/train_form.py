"""The LoRA training form, validated here and by the agent before any job starts. The
dataset is a JSONL file on the agent's machine or a dataset repository (OWNER/NAME, pulled
first); the cached datasets are offered in a list under the fields."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

FIELDS = [  # (id, label, default, kind)
    ("dataset", "Dataset (OWNER/NAME or file)", "", str),
    ("name", "Adapter name", "", str),
    ("rank", "LoRA rank", "8", int),
    ("alpha", "LoRA alpha", "32", int),
    ("target_modules", "Target modules", "all-linear", str),
    ("max_steps", "Steps (0: one epoch)", "0", int),
    ("learning_rate", "Learning rate", "1e-4", float),
]


def validate(values: dict[str, str]) -> tuple[dict, str | None]:
    """Typed values, or the first problem in words a person reads."""
    out = {}
    for key, label, _, kind in FIELDS:
        raw = values.get(key, "").strip()
        if not raw:
            return out, f"{label} is required"
        try:
            out[key] = kind(raw)
        except ValueError:
            return out, f"{label} must be a {'whole number' if kind is int else 'number'}, not {raw!r}"
    if not 1 <= out["rank"] <= 1024:
        return out, "LoRA rank must be between 1 and 1024"
    if not 1 <= out["alpha"] <= 4096:
        return out, "LoRA alpha must be between 1 and 4096"
    if out["max_steps"] < 0:
        return out, "Steps cannot be negative"
    if not 0 < out["learning_rate"] < 1:
        return out, "Learning rate must be between 0 and 1"
    return out, None


class TrainFormScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss_form", "Cancel")]

    def __init__(self, model: str, extra: dict | None = None, datasets: list[str] | None = None):
        super().__init__()
        self.model, self.extra = model, extra or {}
        self.datasets = datasets or []  # cached datasets, as OWNER/NAME@REV

    def compose(self) -> ComposeResult:
        with Vertical(id="train-form"):
            yield Label(f"Train a LoRA adapter on {self.model}", id="train-title")
            with Grid(id="train-grid"):
                for key, label, default, _ in FIELDS:
                    yield Label(label)
                    yield Input(value=default, id=f"train-{key}")
                    if key == "dataset":
                        yield Label("  or a cached dataset")
                        if self.datasets:
                            yield Select([(name, name) for name in self.datasets], id="train-dataset-pick",
                                         prompt=f"pick one of {len(self.datasets)}", compact=True)
                        else:
                            yield Static("none yet: type OWNER/NAME to pull one", id="train-dataset-pick")
            yield Static("", id="form-error")
            with Horizontal(id="train-buttons"):
                yield Button("Start training", variant="primary", id="train-start")
                yield Button("Cancel", id="train-cancel")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.BLANK:
            self.query_one("#train-dataset", Input).value = str(event.value)

    def values(self) -> dict[str, str]:
        return {key: self.query_one(f"#train-{key}", Input).value for key, *_ in FIELDS}

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "train-cancel":
            self.dismiss(None)
            return
        values, problem = validate(self.values())
        if problem:
            self.query_one("#form-error", Static).update(f"⚠ {problem}")
            return
        self.query_one("#form-error", Static).update("checking the dataset and starting…")
        self.submit(values)

    @work(thread=True, exclusive=True)
    def submit(self, values: dict) -> None:
        try:
            job = self.app.link.call("train_start", {"model": self.model, **values, **self.extra}, timeout=900)
        except Exception as e:
            self.app.call_from_thread(self.query_one("#form-error", Static).update, f"⚠ {e}")
            return
        self.app.call_from_thread(self.dismiss, job)

    def action_dismiss_form(self) -> None:
        self.dismiss(None)
