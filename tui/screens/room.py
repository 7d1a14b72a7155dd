"""The room: which room this machine is in, the teacher, and (on request) the join code
with its QR code, for a class to scan from the teacher's screen. Read from the room file
beside the config file (``agent.room``), as ``shoal room show`` reads it. Below, live
(every ``POLL`` seconds): on the teacher's machine the room as ``shoal room status`` shows
it (every member, each assignment's state and percent, who is stuck and why, the ETA
beside the bound); on a student's, the assignments as ``shoal room assignments`` does."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

POLL = 2.0


def _size(n: float) -> str:
    from agent.progress import human_bytes
    return human_bytes(int(n))


def render_room_status(view: dict) -> str:
    """The teacher's view (the control API's ``room_status``) as the screen shows it."""
    bound = view["bound"]
    if not view["assignments"]:
        return f"Nothing assigned yet ({bound['members']} members online or known): `shoal room push MODEL`."
    eta = "-" if bound["eta_s"] is None else f"{bound['eta_s']:.0f} s"
    lines = [f"Assignments (record #{view['seq']}): {100 * bound['done']:.0f}% done in {bound['elapsed_s']:.0f} s, "
             f"ETA {eta} (bound {bound['t_min_s']:.0f} s)"]
    for a in view["assignments"]:
        sources = ", ".join(f"{k} {_size(v)}" for k, v in sorted(a["by_source"].items())) or "-"
        lines.append(f"  {a['ref']}: {a['complete']}/{a['members']} complete, {a['percent']:.0f}% ({sources})")
    lines.append("Members:")
    for m in view["members"]:
        states = "  ".join(f"{m['items'][a['ref']]['state']} {m['items'][a['ref']]['percent']:.0f}%"
                           for a in view["assignments"])
        lines.append(f"  {'●' if m['online'] else '○'} {m['name']:<16} {m['addr'] or '-':<22} {m['via'] or '-':<9} {states}")
    for s in view["stuck"]:
        lines.append(f"  ⚠ {s['member']}: {s['ref']}: {s['why']}")
    return "\n".join(lines)


def render_assignments(held: dict) -> str:
    """A member's view (``room_assignments``) as the screen shows it."""
    record = held.get("record")
    if record is None:
        return "No assignments from the teacher yet."
    lines = [f"The teacher's assignments (record #{record['seq']}):"]
    for item in record["items"]:
        state = held["items"].get(item["ref"], {})
        done = f"{100 * state['have'] / state['total']:.0f}%" if state.get("total") else ""
        detail = state.get("detail") or held.get("keeps", {}).get(item["ref"], "")
        lines.append(f"  {item['ref']}: {state.get('state', '?')} {done}  {detail}".rstrip())
    return "\n".join(lines)


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
            yield Static("", id="room-live")
            yield Static("", id="room-code")
            with Horizontal(id="room-buttons"):
                yield Button("Show join code", variant="primary", id="room-show-code", disabled=True)
                yield Button("Close", id="room-close")

    def on_mount(self) -> None:
        self.load()
        self.set_interval(POLL, self.poll)

    @work(thread=True, exclusive=True, group="room-live")
    def poll(self) -> None:
        """The room, live: the teacher's view, or this member's assignments."""
        if not self.found or "room" not in self.found:
            return
        try:
            if self.found["teacher"]:
                text = render_room_status(self.app.link.call("room_status"))
            else:
                text = render_assignments(self.app.link.call("room_assignments"))
        except Exception as e:  # the agent answers in words (in no room yet, stopped): shown as they are
            text = f"(the agent: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        self.app.call_from_thread(self.query_one("#room-live", Static).update, text)

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
        self.poll()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "room-close":
            self.dismiss(None)
        elif event.button.id == "room-show-code" and self.found and "room" in self.found:
            from agent.room import encode_code, qr_text
            code = encode_code(self.found["room"])
            self.query_one("#room-info", Static).display = False  # the QR code needs the height
            self.query_one("#room-live", Static).display = False
            self.query_one("#room-code", Static).update(f"join code: {code}\n{qr_text(code)}")
            event.button.disabled = True

    def action_close(self) -> None:
        self.dismiss(None)
