"""Rooms: room create (the teacher), room join CODE (each student), room show, room leave.

See ``agent.room`` for what the join code carries and what it grants. Each command writes
or removes the room file beside the agent's config file and asks the running agent to
reload its settings (``reload``: the agent's own user or root; otherwise it says how).
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.cli.common import settings_of
from agent.config import config_path, room_path
from agent.errors import UsageError


def _room_file() -> Path:
    return room_path(config_path())


def _reload_agent(args) -> str:
    """Ask the agent to take the new settings; what happened, in words."""
    from agent.client import AgentBackend
    settings = settings_of(args)
    try:
        backend = AgentBackend.connect(settings)
    except UsageError:
        backend = None
    if backend is None:
        return ("no agent is running for this cache: start it (`systemctl start shoal-agent`, or "
                "`shoal agent`) and it reads the room")
    try:
        backend.call("reload")
    except UsageError as e:
        return f"the agent was not reloaded ({e}); run `sudo systemctl reload shoal-agent`"
    return "the agent reloaded its settings: it is in the room now"


def _local_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (from ``ip``; nothing is sent)."""
    import subprocess  # here: every `shoal` command imports this module
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]


def _teacher_key(settings) -> bytes:
    """This agent's publisher key (its identity), created if it has none yet, owned by the
    cache's owner (the agent's user) when root creates it."""
    from agent.swarm.trust import Identity
    cache = Path(settings.cache_dir)
    key_file = cache / "identity.key"
    existed = key_file.exists()
    identity = Identity.load_or_create(key_file)
    if not existed and os.getuid() == 0:
        st = cache.stat()
        os.chown(key_file, st.st_uid, st.st_gid, follow_symlinks=False)
    return identity.public_key


def _print_code(code: str) -> None:
    from agent.room import qr_text
    print(f"join code: {code}")
    print(qr_text(code), end="")


def cmd_room_create(args) -> int:
    from agent.room import MAX_ADDRS, ROOM_PORT, encode_code, new_room, write_room_file
    settings = settings_of(args)
    port = args.port or ROOM_PORT
    hosts = args.addr or _local_addresses()[:MAX_ADDRS]
    if not hosts:
        raise UsageError("cannot tell this machine's LAN address: name it with --addr IP (students dial it)")
    addrs = []
    for host in hosts[:MAX_ADDRS]:
        ip, _, p = host.partition(":")
        addrs.append((ip, int(p) if p else port))
    path = _room_file()
    room = new_room(args.name, _teacher_key(settings), addrs)
    write_room_file(path, room, teacher=True, port=port, group=settings.control_group)
    print(f"room {room.name!r} created ({path}); students run:\n\n"
          f"    shoal room join CODE        (or: sudo bootstrap/install-agent --join CODE)\n")
    _print_code(encode_code(room))
    print(f"\nteacher key {room.publisher_id}; students dial {', '.join(f'{i}:{p}' for i, p in room.addrs)}\n"
          "publish a model for the room with `shoal publish OWNER/NAME` once it is pulled here.\n"
          "Whoever holds the code can join the room: hand it to the class only.")
    print(_reload_agent(args))
    return 0


def cmd_room_join(args) -> int:
    from agent.room import ROOM_PORT, decode_code, write_room_file
    room = decode_code(args.code)
    path = _room_file()
    write_room_file(path, room, teacher=False, port=args.port or ROOM_PORT,
                    group=settings_of(args).control_group)
    print(f"joined room {room.name!r} ({path}); the teacher is {', '.join(f'{i}:{p}' for i, p in room.addrs)}, "
          f"models signed by {room.publisher_id[:16]}... are trusted")
    print(_reload_agent(args))
    return 0


def cmd_room_show(args) -> int:
    from agent.room import encode_code, read_room_file
    path = _room_file()
    found = read_room_file(path)
    if found is None:
        print("not in a room: `shoal room join CODE` joins one, `shoal room create NAME` makes one")
        return 0
    room, teacher = found
    print(f"room {room.name!r} ({'teacher' if teacher else 'student'}; {path})\n"
          f"  teacher key {room.publisher_id}\n"
          f"  teacher at  {', '.join(f'{i}:{p}' for i, p in room.addrs)}")
    if args.code:
        _print_code(encode_code(room))
    else:
        print("  `shoal room show --code` prints the join code (it admits its holder to the room)")
    return 0


def cmd_room_leave(args) -> int:
    path = _room_file()
    try:
        path.unlink()
    except FileNotFoundError:
        print("not in a room")
        return 0
    print(f"left the room ({path} removed)")
    print(_reload_agent(args))
    return 0


def register(sub) -> None:
    room = sub.add_parser("room", help="a classroom's swarm: create one (teacher), join it with a code (students)")
    rsub = room.add_subparsers(dest="room_command", required=True, metavar="COMMAND")
    p = rsub.add_parser("create", help="make a room on this (the teacher's) machine and print its join code")
    p.add_argument("name")
    p.add_argument("--addr", action="append", metavar="IP[:PORT]",
                   help="an address students dial (default: this machine's LAN addresses)")
    p.add_argument("--port", type=int, help="the swarm port of the room's agents (default 7100)")
    p.set_defaults(func=cmd_room_create)
    p = rsub.add_parser("join", help="join the room a join code names, and reload the agent")
    p.add_argument("code", metavar="CODE")
    p.add_argument("--port", type=int, help="this agent's swarm port (default 7100)")
    p.set_defaults(func=cmd_room_join)
    p = rsub.add_parser("show", help="the room this machine is in")
    p.add_argument("--code", action="store_true", help="print the join code and its QR code")
    p.set_defaults(func=cmd_room_show)
    p = rsub.add_parser("leave", help="leave the room, and reload the agent")
    p.set_defaults(func=cmd_room_leave)
    from agent.cli.assign import register_room
    register_room(rsub)

