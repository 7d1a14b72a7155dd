"""Messages workers post to the UI thread (Textual messages are dataclass-like)."""

from __future__ import annotations

from textual.message import Message


class AgentSnapshot(Message):
    """A fresh look at the agent: status, models, jobs (and mirror models when fetched)."""

    def __init__(self, status: dict, models: list[dict], jobs: list[dict], mirror: list[dict] | None):
        super().__init__()
        self.status, self.models, self.jobs, self.mirror = status, models, jobs, mirror


class PullFinished(Message):
    def __init__(self, model: str, result: dict | None, error: str | None):
        super().__init__()
        self.model, self.result, self.error = model, result, error


class ChatDelta(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text
