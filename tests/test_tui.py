"""The terminal UI: functional tests with Pilot against a real agent (real local servers,
real models), snapshot tests of every screen with fixed data, and one run in a real
terminal under tmux.

Textual runs on asyncio and this suite's async tests on trio, so each UI test drives its
own asyncio loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from agent.config import load_settings
from conftest import MODEL_ID, REPO, TESTS, AgentProcess, mirror

pytestmark = pytest.mark.timeout(300)

TINY = "lab/tiny-chat"
FLAGS = {"model_type": "qwen2", "template": "qwen"}


def text_of(widget) -> str:
    return str(widget.content)


async def until(pilot, condition, timeout: float = 60.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(step)
    raise AssertionError("condition not met in time")


def table_rows(app, selector: str) -> list[list]:
    table = app.query_one(selector)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.fixture
def ui_env(env, oss, hub, model_dir):
    env = dict(env, SHOAL_GATEWAY_PORT="0")
    mirror(env, model_dir)
    return env


@pytest.fixture
def running_agent(ui_env):
    process = AgentProcess(ui_env).start()
    yield process
    process.stop()


def make_app(env, **kwargs):
    from tui.app import ShoalApp
    from tui.link import AgentLink
    agent_env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    agent_env.update(env, PYTHONPATH=os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)]))
    return ShoalApp(AgentLink(load_settings(env=env), env=agent_env), **kwargs)


def test_pull_a_model_from_the_models_tab_and_see_it_in_the_cache(ui_env, running_agent):
    app = make_app(ui_env)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.query_one("#models-table").row_count)
            row = table_rows(app, "#models-table")[0]
            assert (row[0], row[1], row[4], row[7]) == (MODEL_ID, "model", "mirror", "master")
            await pilot.press("p")
            await until(pilot, lambda: app.query_one("#tabs").active == "tab-transfers")
            await until(pilot, lambda: any(m["state"] == "complete" for m in app._models()))
            app.show_tab("tab-models")
            await pilot.press("r")
            await until(pilot, lambda: table_rows(app, "#models-table")[0][2] == "100%")
            row = table_rows(app, "#models-table")[0]
            assert row[4] == "cache+mirror" and row[3] == "2.1 MB"
            await pilot.press("enter")
            await until(pilot, lambda: type(app.screen).__name__ == "ModelDetailScreen")
            assert "complete" in text_of(app.screen.query_one("#detail-head"))
            assert len(app.screen.query_one("#detail-files").rows) == 5
    asyncio.run(scenario())


def test_the_ui_starts_an_embedded_agent_when_none_runs(ui_env):
    app = make_app(ui_env)

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.status is not None)
            assert app.mode_name == "embedded"
            assert "agent embedded" in text_of(app.query_one("#status"))
    asyncio.run(scenario())
    assert not (Path(ui_env["SHOAL_CACHE_DIR"]) / "agent.sock").exists()  # stopped with the UI


def test_chat_with_a_tiny_model_gets_a_reply(ui_env, running_agent, hub, tmp_path):
    from agent.testing.tiny_llm import make_tiny_llm
    hub.add_model(TINY, make_tiny_llm(tmp_path / "tiny"))
    app = make_app(ui_env, launch_flags=FLAGS)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.status is not None)
            await pilot.press("slash")
            await pilot.press(*TINY, "enter")  # a model not listed: typed and pulled
            await until(pilot, lambda: any(m["model"] == TINY and m["state"] == "complete" for m in app._models()))
            app.show_tab("tab-models")
            app.query_one("#model-filter").value = "tiny-chat"
            await until(pilot, lambda: app.query_one("#models-table").row_count == 1)
            await pilot.press("u")
            await until(pilot, lambda: type(app.screen).__name__ == "ChatScreen")
            await until(pilot, lambda: not app.screen.query_one("#chat-input").disabled, timeout=180)
            await pilot.press(*"hello", "enter")
            log = app.screen.query_one("#chat-log")
            await until(pilot, lambda: len(log.lines) >= 2, timeout=120)
            assert "you:" in str(log.lines[0].text) and "tiny-chat:" in str(log.lines[1].text)
            await pilot.press("escape")
            jobs = app.link.call("jobs")
            assert [j["kind"] for j in jobs] == ["chat"] and jobs[0]["state"] in ("cancelled", "done")
    asyncio.run(scenario())


def test_an_invalid_training_form_says_what_is_wrong(ui_env, running_agent, hub, tmp_path):
    from agent.testing.tiny_llm import make_chat_dataset
    hub.add_dataset("lab/chat-data", make_chat_dataset(tmp_path / "chat-data"))
    app = make_app(ui_env, launch_flags=FLAGS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not a chat"}\n')

    async def scenario():
        async with app.run_test(size=(100, 34)) as pilot:
            await until(pilot, lambda: app.query_one("#models-table").row_count)
            # A dataset typed in the filter is pulled and listed as one; it is not trained.
            await pilot.press("slash")
            await pilot.press(*"datasets/lab/chat-data", "enter")
            await until(pilot, lambda: any(m["kind"] == "dataset" and m["state"] == "complete" for m in app._models()))
            app.show_tab("tab-models")
            app.query_one("#model-filter").value = "datasets/"
            await until(pilot, lambda: [r[:3] for r in table_rows(app, "#models-table")] ==
                        [["lab/chat-data", "dataset", "100%"]])
            await pilot.press("t")
            await pilot.pause(0.3)
            assert type(app.screen).__name__ != "TrainFormScreen"
            app.query_one("#model-filter").value = ""
            await until(pilot, lambda: app.query_one("#models-table").row_count == 2)
            app.query_one("#models-table").move_cursor(
                row=[r[1] for r in table_rows(app, "#models-table")].index("model"))
            await pilot.press("t")
            await until(pilot, lambda: type(app.screen).__name__ == "TrainFormScreen")
            form = app.screen
            pick = form.query_one("#train-dataset-pick")  # the cached datasets are offered
            pick.value = "lab/chat-data@master"
            await until(pilot, lambda: form.query_one("#train-dataset").value == "lab/chat-data@master")
            form.query_one("#train-dataset").value = str(bad)
            form.query_one("#train-name").value = "mine"
            form.query_one("#train-rank").value = "eight"
            await pilot.click("#train-start")
            await until(pilot, lambda: "LoRA rank must be a whole number" in text_of(form.query_one("#form-error")))
            form.query_one("#train-rank").value = "8"
            form.query_one("#train-start").press()
            try:
                await until(pilot, lambda: "is not a chat record" in text_of(form.query_one("#form-error")), 20)
            except AssertionError:
                raise AssertionError(text_of(form.query_one("#form-error")))
            assert type(app.screen).__name__ == "TrainFormScreen"  # nothing started
            assert app.link.call("jobs") == []
    asyncio.run(scenario())


def test_the_room_screen_shows_the_room_and_the_join_code_as_a_qr_code_on_request(tmp_path, monkeypatch):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from agent.room import encode_code, new_room, write_room_file
    from conftest import scan_terminal_qr
    monkeypatch.setenv("SHOAL_CONFIG", str(tmp_path / "config.toml"))
    room = new_room("Lab 3", Ed25519PrivateKey.generate().public_key().public_bytes_raw(), [("10.0.0.5", 7100)])
    write_room_file(tmp_path / "room.toml", room, teacher=True)
    code = encode_code(room)
    app = make_app({"SHOAL_CACHE_DIR": str(tmp_path / "cache")}, auto_refresh=False)

    async def scenario():
        async with app.run_test(size=(100, 50)) as pilot:
            await pilot.press("o")
            await until(pilot, lambda: type(app.screen).__name__ == "RoomScreen")
            info = await until(pilot, lambda: "Lab 3" in text_of(app.screen.query_one("#room-info"))
                               and text_of(app.screen.query_one("#room-info")))
            assert "teacher" in info and "10.0.0.5:7100" in info and room.publisher_id in info
            assert code not in info  # the code admits its holder: shown only when asked
            await pilot.click("#room-show-code")
            shown = await until(pilot, lambda: text_of(app.screen.query_one("#room-code")))
            assert f"join code: {code}" in shown
            assert scan_terminal_qr(shown) == [code]  # what a student's phone reads from the screen
            await pilot.press("escape")
            await until(pilot, lambda: type(app.screen).__name__ != "RoomScreen")
    asyncio.run(scenario())


def test_the_room_screen_without_a_room_says_how_to_join(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_CONFIG", str(tmp_path / "config.toml"))
    app = make_app({"SHOAL_CACHE_DIR": str(tmp_path / "cache")}, auto_refresh=False)

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("o")
            await until(pilot, lambda: "Not in a room" in text_of(app.screen.query_one("#room-info")))
            assert "shoal room join CODE" in text_of(app.screen.query_one("#room-info"))
            assert app.screen.query_one("#room-show-code").disabled
    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_shoal_tui_in_a_real_terminal_shows_the_pulled_model(ui_env, running_agent, tmp_path):
    from conftest import run_shoal
    run_shoal(["pull", MODEL_ID], ui_env, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "SHOAL_", "MODELSCOPE_"))}
    env.update(ui_env, PYTHONPATH=os.pathsep.join([str(TESTS / "loopback_guard"), str(REPO)]), TERM="xterm-256color")
    exports = " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()
                       if k.startswith(("SHOAL_", "OSS_", "MODELSCOPE_", "PYTHONPATH", "TERM")))
    import sys
    from conftest import Tmux
    term = Tmux("shoal-tui", f"env {exports} {sys.executable} -m agent.cli tui")
    try:
        screen = term.wait_for(MODEL_ID, "100%")
        assert MODEL_ID in screen and "100%" in screen and "cache" in screen, screen
        term.keys("Enter")
        screen = term.wait_for("model-00001-of-00002.safetensors", timeout=20)
        assert "manifest" in screen and "model-00001-of-00002.safetensors" in screen, screen
        (tmp_path / "tmux-detail.txt").write_text(screen)
        term.keys("Escape")
        term.quit()
    finally:
        term.close()
