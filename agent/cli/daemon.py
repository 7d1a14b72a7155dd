"""The agent and what only it can tell: agent, status, env, peers, config."""

from __future__ import annotations

import json
import logging
import os
import sys

from agent.cli.common import backend_of, settings_of, table
from agent.errors import AgentNeeded, Terminated
from agent.progress import human_bytes


def cmd_agent(args) -> int:
    from agent import memory
    memory.limit_arenas()  # before the agent starts any thread (agent.memory says why)
    from agent.runtime import run_until_signal
    from agent.service import serve_agent
    settings = settings_of(args)
    # SHOAL_LOG_LEVEL=DEBUG shows the swarm's decisions (each origin chunk and why it is ours).
    level = os.environ.get("SHOAL_LOG_LEVEL", "INFO").upper()
    logging.getLogger("shoal").setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
    if args.log_json:
        from agent.logs import JsonLogFormatter
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())

    async def main():
        return await serve_agent(settings)

    print(f"shoal agent: serving {settings.cache_dir} (socket {settings.socket_path}); "
          "Ctrl-C or SIGTERM stops it, SIGHUP reloads its settings", file=sys.stderr, flush=True)
    reload = False
    try:
        reload = run_until_signal(main)
    except Terminated:
        pass
    if reload:
        # The same process (systemd keeps following its pid), the settings read afresh.
        print("shoal agent: reloading its settings", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "agent.cli", *sys.argv[1:]])
    print("shoal agent: stopped; verified chunks are kept", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    status = backend_of(args, need_agent=True).call("status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    quota = human_bytes(status["quota_bytes"]) if status["quota_bytes"] else "none"
    rate = lambda r: f"{human_bytes(r)}/s" if r else "unlimited"  # noqa: E731
    print(f"shoal agent {status['version']} pid {status['pid']}, up {status['uptime_s']:.0f} s\n"
          f"  cache {status['cache_dir']}: {human_bytes(status['usage_bytes'])} used, quota {quota}\n"
          f"  control socket {status['socket']}\n"
          f"  gateway {status['gateway']}  (MODELSCOPE_ENDPOINT and HF_ENDPOINT; `shoal env`)\n"
          f"  download cap {rate(status['download_rate'])}, upload cap {rate(status['upload_rate'])}, "
          f"{status['upload_slots']} upload slots\n"
          f"  sources: {', '.join(status['sources'])}")
    if status.get("swarm"):
        print(f"  swarm: {', '.join(status['swarm']['addrs'])}  ({len(status['peers'])} peers; `shoal peers`)")
    for p in status["pulls"]:
        pct = 100 * p["done_bytes"] / p["total_bytes"] if p["total_bytes"] else 0
        print(f"  pulling {p['model']}: {pct:.0f}% of {human_bytes(p['total_bytes'])} ({p['clients']} clients)")
    return 0


def cmd_peers(args) -> int:
    peers = backend_of(args, need_agent=True).call("peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("no LAN peers yet: the agent finds them by mDNS and the DHT when SHOAL_SWARM=1, or dials "
              "SHOAL_SWARM_PEERS=<multiaddr>,...")
        return 0
    rows = [("PEER", "ADDRESS", "WHERE", "FOUND BY", "STATE", "RTT", "HOLDS", "DOWN", "UP", "PROBLEM")]
    for p in peers:
        holds = ", ".join(f"{m} {h['chunks']}/{h['of']}" for m, h in (p.get("holds") or {}).items()) or "-"
        rtt = f"{p['rtt_ms']:.0f} ms" if p.get("rtt_ms") is not None else "-"
        problem = f"dropped: {p['dropped']}" if p.get("dropped") else (p.get("error") or "")
        state = "connected" if p.get("connected") else "down"
        rows.append((p["id"][:20], p.get("addr") or "", p.get("location") or "-", p.get("via") or "", state, rtt,
                     holds[:50], human_bytes(p.get("bytes_down", 0)), human_bytes(p.get("bytes_up", 0)),
                     problem[:60]))
    table(rows)
    return 0


def cmd_config(args) -> int:
    if args.config_command == "set":
        backend_of(args, need_agent=True).call("config_set", {"key": args.key, "value": args.value})
        print(f"{args.key} = {args.value} (until the agent restarts; put it in the config file to keep it)")
        return 0
    backend = backend_of(args)
    table([("SETTING", "VALUE", "ENVIRONMENT", "TOML KEY")] + [tuple(r) for r in backend.config()])
    from agent.client import AgentBackend
    if isinstance(backend, AgentBackend):  # what the running agent has in force now
        caps = backend.call("status")["caps"]
        shown = ", ".join(f"{k} {human_bytes(v) + '/s' if v else 'unlimited'}" for k, v in caps.items() if k != "rule")
        whence = f"the rate schedule's rule {caps['rule']}" if caps["rule"] else "the settings (no rule of the schedule holds now)"
        print(f"caps in force: {shown} ({whence})")
    return 0


def gateway_url(args) -> tuple[str | None, bool]:
    """(the gateway's URL, whether its agent runs): the running agent's, else the one the
    settings give an agent started now (None if its port is chosen at start, 0)."""
    from agent.client import AgentBackend
    settings = settings_of(args)
    backend = AgentBackend.connect(settings)
    if backend is not None:
        return backend.call("status")["gateway"], True
    return (f"http://127.0.0.1:{settings.gateway_port}" if settings.gateway_port else None), False


def cmd_env(args) -> int:
    from agent.toolenv import tool_env
    gateway, running = gateway_url(args)
    if gateway is None:
        raise AgentNeeded("no shoal agent is running and its gateway port is chosen when it starts "
                          "(SHOAL_GATEWAY_PORT=0): start the agent, then run `shoal env` again")
    lines = tool_env(gateway)
    if args.json:
        print(json.dumps({var: value for var, value, _ in lines}, indent=2))
        return 0
    if not running:
        print(f"# no shoal agent is running yet: start it (`shoal agent`, `systemctl start shoal-agent`); "
              f"its gateway will be {gateway}", file=sys.stderr)
    print("# hub tools through the shoal agent's gateway: eval \"$(shoal env)\", or paste into ~/.bashrc")
    for var, value, why in lines:
        print(f"export {var}={value}  # {why}")
    print("unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE  # the gateway works offline; with these set tools never ask it")
    return 0


def register(sub) -> None:
    p = sub.add_parser("agent", help="run the background agent (control socket, gateway, metrics)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line (for journald)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("status", help="what the running agent is doing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("env", help="the lines that point hub tools (Hugging Face, ModelScope) at the agent's gateway")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("peers", help="the agent's LAN peers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peers)

    config = sub.add_parser("config", help="show the effective settings, or change a limit at run time")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    p = csub.add_parser("show", help="every setting, its value (secrets masked) and where to set it")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("set", help="change download_rate, outside_download_rate, upload_rate or upload_slots in "
                                    "the running agent")
    p.add_argument("key", choices=["download_rate", "outside_download_rate", "upload_rate", "upload_slots"])
    p.add_argument("value", help="bytes per second (e.g. 50MB, 0 for unlimited), or a slot count")
    p.set_defaults(func=cmd_config)
