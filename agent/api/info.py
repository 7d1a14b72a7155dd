"""Control API methods about the agent itself: ping, status, config_show, config_set, reload,
sources, peers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import trio

from agent import __version__
from agent.api.table import Call, NoParams, method
from agent.config import describe, parse_size
from agent.cpu import snapshot as cpu_snapshot
from agent.errors import UsageError

LIVE_SETTINGS = ("download_rate", "outside_download_rate", "upload_rate", "upload_slots")  # what config_set changes at run time


@method("ping", NoParams, "Whether the agent answers: its version and pid (what clients ask first).", quiet=True)
async def ping(agent, p: NoParams, call: Call):
    return {"version": __version__, "pid": os.getpid()}


@method("status", NoParams, "What the agent is doing: version, cache use, limits, pulls, swarm, peers, CPU.",
        quiet=True)
async def status(agent, p: NoParams, call: Call):
    usage = await trio.to_thread.run_sync(agent.store.usage)
    swarm = agent.swarm
    return {"pid": os.getpid(), "version": __version__, "uptime_s": round(time.time() - agent.started, 1),
            "cache_dir": str(agent.settings.cache_dir), "socket": str(agent.settings.socket_path),
            "gateway": agent.gateway_url, "usage_bytes": usage, "quota_bytes": agent.settings.quota,
            "download_rate": agent.download.rate, "upload_rate": agent.upload.rate, "caps": agent.caps_now(),
            "upload_slots": agent.upload_slots.total_tokens, "cpu": cpu_snapshot(),
            "loop_lag_ms": round(agent.loop_lag_s * 1000, 1),
            "pulls": agent.pulls.snapshot(),
            "sources": [s.label for s in agent.sources],
            "swarm": None if swarm is None else swarm.describe(),
            "peers": [] if swarm is None else swarm.snapshot()}


def _config_rows(agent) -> list[list[str]]:
    caps = agent.caps_now()
    live = {"download_rate": caps["download_rate"], "outside_download_rate": caps["outside_download_rate"],
            "upload_rate": caps["upload_rate"], "upload_slots": agent.upload_slots.total_tokens}
    return [[name, str(live[name]) if name in live and live[name] is not None else
             ("" if name in live else value), env, key] for name, value, env, key in describe(agent.settings)]


@method("config_show", NoParams, "Every setting: name, value (secrets masked), environment variable, TOML key.", quiet=True)
async def config_show(agent, p: NoParams, call: Call):
    return _config_rows(agent)


@dataclass(frozen=True)
class ConfigSetParams:
    key: str  # one of LIVE_SETTINGS
    value: str | int  # bytes per second ("50MB", 0 for unlimited), or a slot count


@method("config_set", ConfigSetParams,
        "Change `download_rate`, `outside_download_rate`, `upload_rate` or `upload_slots` until the agent restarts "
        "(a rule of the rate schedule still wins in its hours); the new settings.")
async def config_set(agent, p: ConfigSetParams, call: Call):
    if p.key not in LIVE_SETTINGS:
        raise UsageError(f"{p.key!r} cannot be changed at run time; the agent takes {', '.join(LIVE_SETTINGS)} "
                         "(others: edit the config file and restart)")
    try:
        if p.key in ("download_rate", "upload_rate", "outside_download_rate"):
            agent.base_caps[p.key] = parse_size(p.value)  # a rule of the rate schedule still wins in its hours
            from agent.schedule import caps_at, minute_of_day
            agent.apply_caps(*caps_at(agent.rate_rules, agent.base_caps, minute_of_day(time.time())))
        else:
            slots = int(p.value)
            if not 1 <= slots <= 256:
                raise ValueError(p.value)
            agent.upload_slots.total_tokens = slots
            if agent.swarm is not None:
                agent.swarm.set_upload_slots(slots)
    except (TypeError, ValueError):
        raise UsageError(f"{p.value!r} is not a valid value for {p.key}") from None
    return _config_rows(agent)


@method("reload", NoParams, "Re-read the settings (the agent's own user or root only): running pulls stop, "
        "the agent serves again in a moment.")
async def reload(agent, p: NoParams, call: Call):
    if call.uid not in (os.getuid(), 0):
        raise UsageError(f"only the agent's own user (uid {os.getuid()}) or root may reload it")
    agent.request_reload(f"asked by uid {call.uid}", after=0.2)
    return {"reloading": True, "pid": os.getpid()}


@method("sources", NoParams, "The sources a pull tries, in order: name and label.", quiet=True)
async def sources(agent, p: NoParams, call: Call):
    return [{"name": s.name, "label": s.label} for s in agent.sources]


@method("peers", NoParams, "LAN peers: address, how found, state, RTT, what they hold, traffic, problems.", quiet=True)
async def peers(agent, p: NoParams, call: Call):
    return [] if agent.swarm is None else agent.swarm.snapshot()
