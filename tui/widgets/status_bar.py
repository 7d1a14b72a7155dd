"""The bottom line: agent state, cache use against quota, caps, sources."""

from __future__ import annotations

from textual.widgets import Static

from agent.progress import human_bytes


def status_line(status: dict | None, mode: str) -> str:
    if not status:
        return f"agent: connecting ({mode})"
    quota = f"/{human_bytes(status['quota_bytes'])}" if status.get("quota_bytes") else ""
    rate = lambda r: f"{human_bytes(r)}/s" if r else "∞"  # noqa: E731
    pulls = len(status.get("pulls", []))
    return (f"agent {mode} pid {status['pid']} │ cache {human_bytes(status['usage_bytes'])}{quota} │ "
            f"↓ {rate(status.get('download_rate'))} ↑ {rate(status.get('upload_rate'))} │ "
            f"pulls {pulls} │ sources: {', '.join(status.get('sources', []))}")


class StatusBar(Static):
    def show(self, status: dict | None, mode: str) -> None:
        self.update(status_line(status, mode))
