"""Bandwidth by time of day (``agent.schedule``): rules parsed from the config file or the
environment, the caps in force at each minute, and the agent's follower changing them at
the boundary, on a virtual clock."""

from __future__ import annotations

import time

import pytest
import trio

from agent import schedule
from agent.config import load_settings
from agent.errors import ConfigError

RULES = "07:00-18:00 outside_download_rate=5MB upload_rate=10MB; 18:00-07:00 outside_download_rate=unlimited"
BASE = {"download_rate": None, "outside_download_rate": 1_000_000, "upload_rate": None}


def test_the_rule_in_force_and_when_it_changes():
    rules = schedule.parse(RULES)
    caps, hours = schedule.caps_at(rules, BASE, 8 * 60)
    assert hours == "07:00-18:00" and caps == {"download_rate": None, "outside_download_rate": 5_000_000,
                                               "upload_rate": 10_000_000}
    caps, hours = schedule.caps_at(rules, BASE, 23 * 60)  # the night rule runs past midnight
    assert hours == "18:00-07:00" and caps["outside_download_rate"] is None and caps["upload_rate"] is None
    assert schedule.caps_at(rules, BASE, 3 * 60)[1] == "18:00-07:00"
    assert schedule.caps_at((), BASE, 3 * 60) == (BASE, None)
    assert schedule.minutes_to_next_change(rules, 6 * 60 + 58) == 2
    assert schedule.minutes_to_next_change(rules, 7 * 60) == 11 * 60


def test_the_config_file_and_the_environment_give_the_same_rules(tmp_path):
    (tmp_path / "c.toml").write_text('[[limits.schedule]]\nhours = "07:00-18:00"\noutside_download_rate = "5MB"\n'
                                     'upload_rate = "10MB"\n[[limits.schedule]]\nhours = "18:00-07:00"\n'
                                     'outside_download_rate = "unlimited"\n')
    from_file = load_settings(env={"SHOAL_CONFIG": str(tmp_path / "c.toml")}).rate_schedule
    from_env = load_settings(env={"SHOAL_CONFIG": str(tmp_path / "none.toml"), "SHOAL_RATE_SCHEDULE": RULES}).rate_schedule
    assert schedule.parse(from_file) == schedule.parse(from_env)


@pytest.mark.parametrize("text,message", [
    ("7:00-18:00 upload_rate=1MB", "not hours"), ("07:00-18:00", "sets no cap"),
    ("07:00-18:00 speed=1MB", "CAP=SIZE"), ("07:00-18:00 upload_rate=fast", "not a size")])
def test_a_bad_rule_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env={"SHOAL_CONFIG": str(tmp_path / "none.toml"), "SHOAL_RATE_SCHEDULE": text})


async def test_the_caps_change_at_the_boundary_on_a_virtual_clock(autojump_clock):
    rules = schedule.parse(RULES)
    # The wall clock of this test: 06:58:30 local time when the virtual clock starts.
    start = time.mktime((2026, 12, 7, 6, 58, 30, 0, 0, -1))
    applied: list[tuple[float, str | None, int | None]] = []

    def apply(caps: dict, hours: str | None) -> None:
        applied.append((trio.current_time(), hours, caps["outside_download_rate"]))

    with trio.move_on_after(12 * 3600):
        await schedule.follow(rules, lambda: BASE, apply, lambda: start + trio.current_time())
    changes = [(at, hours, rate) for i, (at, hours, rate) in enumerate(applied)
               if i == 0 or applied[i - 1][1:] != (hours, rate)]
    assert [(h, r) for _, h, r in changes] == [("18:00-07:00", None), ("07:00-18:00", 5_000_000),
                                               ("18:00-07:00", None)]
    # Each change within a second of its boundary (07:00 is 90 s in, 18:00 is 11 h 1.5 min in).
    assert abs(changes[1][0] - 90) < 1 and abs(changes[2][0] - (11 * 3600 + 90)) < 1
    assert len(applied) < 12 * 60 + 10  # about once a minute, not a busy loop


def test_the_agent_shows_the_rule_in_force(tmp_path):
    from conftest import AgentProcess, run_shoal
    env = {"SHOAL_CONFIG": str(tmp_path / "none.toml"), "SHOAL_CACHE_DIR": str(tmp_path / "cache"),
           "SHOAL_GATEWAY_PORT": "0", "SHOAL_MDNS": "0", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
           "SHOAL_RATE_SCHEDULE": "00:00-00:00 outside_download_rate=5MB upload_rate=2MB",
           "SHOAL_DOWNLOAD_RATE": "50MB"}
    agent = AgentProcess(env).start()
    try:
        import json
        caps = json.loads(run_shoal(["status", "--json"], env, check=True).stdout)["caps"]
        assert caps == {"download_rate": 50_000_000, "outside_download_rate": 5_000_000, "upload_rate": 2_000_000,
                        "rule": "00:00-00:00"}
        run_shoal(["config", "set", "download_rate", "20MB"], env, check=True)  # not scheduled: it applies
        shown = run_shoal(["config", "show"], env, check=True).stdout
        assert "caps in force: download_rate 20.0 MB/s" in shown and "the rate schedule's rule 00:00-00:00" in shown
    finally:
        log = agent.stop()
    assert "rate caps:" in log and "the schedule's rule 00:00-00:00" in log


def test_the_tui_settings_say_which_rule_is_in_force():
    from tui.screens.settings import caps_line
    line = caps_line({"download_rate": None, "outside_download_rate": 5_000_000, "upload_rate": None,
                      "rule": "07:00-18:00"})
    assert line == ("In force now: download rate unlimited, outside download rate 5.0 MB/s, upload rate unlimited "
                    "(the rate schedule's rule 07:00-18:00)")
    assert caps_line({"download_rate": None, "rule": None}).endswith("(the settings)")
