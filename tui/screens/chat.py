"""A chat with a model: a session the agent keeps warm; replies stream in."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, RichLog, Static

from tui.messages import ChatDelta


class ChatScreen(Screen):
    BINDINGS = [Binding("escape", "close", "Close chat")]

    def __init__(self, model: str, adapter: str | None = None, extra: dict | None = None):
        super().__init__()
        self.model, self.adapter, self.extra = model, adapter, extra or {}
        self.session: str | None = None
        self._reply: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"Chat with {self.model}" + (f" + {self.adapter}" if self.adapter else "")
                     + "  (loading the model…)", id="chat-title")
        yield RichLog(id="chat-log", wrap=True, markup=True)
        yield Input(placeholder="type a message and press Enter", id="chat-input", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.open_session()

    @work(thread=True, exclusive=True, group="chat-open")
    def open_session(self) -> None:
        params = {"model": self.model, **self.extra}
        if self.adapter:
            params["adapter"] = self.adapter
        try:
            opened = self.app.link.call("chat_open", params, timeout=900)
        except Exception as e:
            self.app.call_from_thread(self.app.show_error, "Chat failed to start", str(e))
            self.app.call_from_thread(self.query_one("#chat-title", Static).update,
                                      f"Chat with {self.model} could not start (Esc to go back): "
                                      f"{str(e).splitlines()[0][:200]}")
            return
        self.session = opened["session"]
        self.app.call_from_thread(self._ready, opened)

    def _ready(self, opened: dict) -> None:
        self.query_one("#chat-title", Static).update(
            f"Chat with {self.model} on {opened['device']} ({opened['engine']}), job {opened['session']}")
        box = self.query_one(Input)
        box.disabled = False
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.session is None:
            return
        event.input.value = ""
        event.input.disabled = True
        self.query_one(RichLog).write(f"[b]you:[/b] {text}")
        self._reply = []
        self.send(text)

    @work(thread=True, exclusive=True, group="chat-send")
    def send(self, text: str) -> None:
        try:
            result = self.app.link.call("chat_send", {"session": self.session, "content": text},
                                        on_event=lambda e: self.post_message(ChatDelta(e.get("text", ""))),
                                        timeout=900)
        except Exception as e:
            self.app.call_from_thread(self.app.show_error, "Chat failed", str(e))
            result = {"reply": "".join(self._reply)}
        self.app.call_from_thread(self._done, result["reply"])

    def on_chat_delta(self, message: ChatDelta) -> None:
        self._reply.append(message.text)

    def _done(self, reply: str) -> None:
        name = self.model.split("/")[-1].split("@")[0]
        # A reply of only whitespace (tiny test models do that) is shown escaped, so it is visible.
        shown = repr(reply) if not reply.strip() else reply
        self.query_one(RichLog).write(f"[b]{name}:[/b] {shown}")
        box = self.query_one(Input)
        box.disabled = False
        box.focus()

    def action_close(self) -> None:
        if self.session:
            session, self.session = self.session, None
            self.app.close_chat(session)
        self.app.pop_screen()
