"""The room: which room this machine is in, the teacher, and (on request) the join code
with its QR code, for a class to scan from the teacher's screen. Read from the room file
beside the config file (``agent.room``), as ``shoal room show`` reads it."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


def read_room() -> dict:
    """What the screen shows: {"room", "teacher", "path"} or {"error"} or {"none"}."""
    from agent.config import config_path, room_path
    from agent.errors import ShoalError
    from agent.room import read_room_file
    path = room_path(config_path())
    try:
        found = read_room_file(path)
    except PermissionError:
        return {"error": f"the room file {path} is the agent's: `sudo shoal room show --code` prints the code"}
    except ShoalError as e:
        return {"error": str(e)}
    if found is None:
        return {"none": f"Not in a room ({path}). A teacher runs `shoal room create NAME`; "
                        "each student `shoal room join CODE`."}
    room, teacher = found
    return {"room": room, "teacher": teacher, "path": path}


class RoomScreen(ModalScreen):
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self):
        super().__init__()
        self.found: dict | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="room-box"):
            yield Label("Room", id="room-title")
            yield Static("reading the room file...", id="room-info")
            yield Static("", id="room-code")
            with Horizontal(id="room-buttons"):
                yield Button("Show join code", variant="primary", id="room-show-code", disabled=True)
                yield Button("Close", id="room-close")

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True)
    def load(self) -> None:
        found = read_room()
        self.app.call_from_thread(self.show, found)

    def show(self, found: dict) -> None:
        self.found = found
        info = self.query_one("#room-info", Static)
        if "room" not in found:
            info.update(found.get("error") or found.get("none", ""))
            return
        room = found["room"]
        info.update(f"{room.name!r}: this machine is the {'teacher' if found['teacher'] else 'student'}\n"
                    f"teacher key  {room.publisher_id}\n"
                    f"teacher at   {', '.join(f'{ip}:{port}' for ip, port in room.addrs)}\n"
                    f"room file    {found['path']}\n\n"
                    "The join code admits whoever holds it to the room: show it to the class only.")
        self.query_one("#room-show-code", Button).disabled = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "room-close":
            self.dismiss(None)
        elif event.button.id == "room-show-code" and self.found and "room" in self.found:
            from agent.room import encode_code, qr_text
            code = encode_code(self.found["room"])
            self.query_one("#room-info", Static).display = False  # the QR code needs the height
            self.query_one("#room-code", Static).update(f"join code: {code}\n{qr_text(code)}")
            event.button.disabled = True

    def action_close(self) -> None:
        self.dismiss(None)
