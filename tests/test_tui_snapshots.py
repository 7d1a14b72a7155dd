"""Snapshots of every screen at 80x24 and 120x40, with fixed data (a recording fake of the
agent link: the outermost edge), so a change in layout shows up as a diff.

Update after an intended change: ``pytest tests/test_tui_snapshots.py --snapshot-update``."""

from __future__ import annotations

import time

import pytest

from tui.app import ShoalApp
from tui.messages import AgentSnapshot

T0 = 1795824000.0  # a fixed moment, shown in UTC
MODELS = [
    {"model": "qwen/Qwen2.5-0.5B-Instruct", "revision": "master", "size": 988_000_000, "have": 988_000_000,
     "state": "complete", "dir": "/var/cache/shoal/models/qwen/Qwen2.5-0.5B-Instruct/master",
     "manifest_id": "c77b2783b99f35a075ff235507e24eaefd2843714d2bf732a0df2344cbadc41b", "pinned": True,
     "last_used": T0, "active": False},
    {"model": "qwen/Qwen2.5-7B-Instruct", "revision": "master", "size": 15_230_000_000, "have": 6_100_000_000,
     "state": "pulling", "dir": "/var/cache/shoal/models/qwen/Qwen2.5-7B-Instruct/master", "manifest_id": None,
     "pinned": False, "last_used": T0, "active": True},
    {"model": "datasets/AI-ModelScope/alpaca-gpt4-data-zh", "kind": "dataset", "revision": "master",
     "size": 41_000_000, "have": 41_000_000, "state": "complete",
     "dir": "/var/cache/shoal/datasets/AI-ModelScope/alpaca-gpt4-data-zh/master",
     "manifest_id": "5f1e0d7c2b3a49586f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5e6d7c8b9a", "pinned": False,
     "last_used": T0, "active": False},
]
MIRROR = [{"model": "qwen/Qwen2.5-0.5B-Instruct", "revision": "master"},
          {"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "master"}]
PULL = {"model": "qwen/Qwen2.5-7B-Instruct@master", "done_bytes": 6_100_000_000, "total_bytes": 15_230_000_000,
        "clients": 2, "by_source": {"oss": 4_500_000_000, "modelscope": 1_600_000_000}}
STATUS = {"pid": 4242, "version": "0.1.0", "uptime_s": 3600, "cache_dir": "/var/cache/shoal",
          "socket": "/var/cache/shoal/agent.sock", "gateway": "http://127.0.0.1:8790",
          "usage_bytes": 16_218_000_000, "quota_bytes": 200_000_000_000, "download_rate": 80_000_000,
          "upload_rate": None, "upload_slots": 8, "pulls": [PULL], "sources": ["OSS mirror", "ModelScope"]}
JOBS = [
    {"id": "train-1128-0930-ab12", "kind": "train", "model": "qwen/Qwen2.5-0.5B-Instruct@master", "argv": [],
     "state": "running", "created": T0 + 60, "ended": None, "pgid": 100, "pid": 101, "exit_code": None,
     "detail": {"adapter": "lab-faq"}},
    {"id": "serve-1128-0900-cd34", "kind": "serve", "model": "qwen/Qwen2.5-0.5B-Instruct@master", "argv": [],
     "state": "cancelled", "created": T0, "ended": T0 + 30, "pgid": 90, "pid": 91, "exit_code": -15,
     "detail": {"url": "http://127.0.0.1:8000/v1"}},
]
DETAIL = {**MODELS[0], "files": [
    {"path": "config.json", "size": 659, "complete": True, "chunks": ["oss"]},
    {"path": "model.safetensors", "size": 988_000_000, "complete": True,
     "chunks": ["oss"] * 40 + ["modelscope"] * 3 + ["oss"] * 16},
    {"path": "tokenizer.json", "size": 7_030_000, "complete": True, "chunks": ["modelscope", "oss"]},
], "peers": []}
PROGRESS = {"job": JOBS[0], "steps": [
    {"step": i, "max_steps": 20, "loss": round(2.5 * 0.9 ** i, 4), "learning_rate": 1e-4 * (1 - i / 20),
     "remaining": f"{(20 - i) * 3}s"} for i in range(1, 13)], "final": {}}
LOG = "\n".join(f"[INFO:swift] {{'loss': {2.5 * 0.9 ** i:.4f}, 'global_step/max_steps': '{i}/20'}}"
                for i in range(1, 13))


class FakeLink:
    """Canned answers for the calls the UI makes; records them."""

    def __init__(self):
        self.calls = []

    def connect(self):
        return "running"

    def call(self, method, params=None, on_event=None, timeout=None):
        self.calls.append((method, params))
        answers = {"status": STATUS, "list": MODELS, "jobs": JOBS, "mirror_models": MIRROR,
                   "model_detail": DETAIL, "job_progress": PROGRESS, "job_log": {"job": JOBS[0]["id"], "log": LOG},
                   "chat_open": {"session": "chat-1128-1000-ef56", "engine": "swift", "device": "cpu"}}
        return answers[method]

    def close(self):
        pass


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    time.tzset()


def loaded(app: ShoalApp) -> None:
    app.mode_name = "running"
    snapshot = AgentSnapshot(STATUS, MODELS, JOBS, MIRROR)
    app.apply_snapshot(snapshot, now=100.0)
    faster = AgentSnapshot({**STATUS, "pulls": [{**PULL, "done_bytes": PULL["done_bytes"] + 95_000_000}]},
                           MODELS, JOBS, MIRROR)
    app.apply_snapshot(faster, now=101.0)


async def open_tab(pilot, tab: str):
    loaded(pilot.app)
    await pilot.pause()
    pilot.app.show_tab(tab)
    await pilot.pause()


SCREENS = {
    "models": lambda pilot: open_tab(pilot, "tab-models"),
    "transfers": lambda pilot: open_tab(pilot, "tab-transfers"),
    "peers": lambda pilot: open_tab(pilot, "tab-peers"),
    "jobs": lambda pilot: open_tab(pilot, "tab-jobs"),
}


async def detail(pilot):
    from tui.screens.detail import ModelDetailScreen
    loaded(pilot.app)
    await pilot.app.push_screen(ModelDetailScreen(DETAIL))
    await pilot.pause()


async def train_form(pilot):
    from tui.screens.train_form import TrainFormScreen
    loaded(pilot.app)
    await pilot.app.push_screen(TrainFormScreen("qwen/Qwen2.5-0.5B-Instruct@master", None,
                                                ["AI-ModelScope/alpaca-gpt4-data-zh@master"]))
    pilot.app.screen.query_one("#train-rank").value = "-3"
    pilot.app.screen.query_one("#train-start").press()
    await pilot.pause()


async def job_detail(pilot):
    from tui.screens.job_detail import JobDetailScreen
    loaded(pilot.app)
    await pilot.app.push_screen(JobDetailScreen(JOBS[0]["id"]))
    await pilot.pause(0.3)


async def settings(pilot):
    from tui.screens.settings import SettingsScreen
    loaded(pilot.app)
    await pilot.app.push_screen(SettingsScreen(STATUS))
    await pilot.pause()


async def chat(pilot):
    from tui.screens.chat import ChatScreen
    loaded(pilot.app)
    screen = ChatScreen("qwen/Qwen2.5-0.5B-Instruct@master")
    await pilot.app.push_screen(screen)
    await pilot.pause(0.3)
    screen.query_one("#chat-log").write("[b]you:[/b] What does shoal verify?")
    screen._done("Every chunk, with BLAKE3, and every file against the origin's SHA-256.")
    await pilot.pause()


SCREENS.update(detail=detail, train_form=train_form, job_detail=job_detail, settings=settings, chat=chat)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", sorted(SCREENS))
def test_screen_snapshot(snap_compare, screen, size):
    app = ShoalApp(FakeLink(), auto_refresh=False)
    assert snap_compare(app, terminal_size=size, run_before=SCREENS[screen])
