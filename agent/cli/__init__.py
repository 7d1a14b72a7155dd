"""The ``shoal`` command: a parser and thin command modules. Nothing outside imports it.

Command modules, each with a ``register(subparsers)``: ``cache`` (pull, ls, verify, rm,
pin, unpin, gc, du, cancel), ``daemon`` (agent, status, peers, config), ``launch``
(doctor, run, serve, train, jobs, logs), ``publish`` (id, publish, mirror push),
``room`` (room create/join/show/leave), ``assign`` (room push/retract/assignments/refuse/status,
bundle export/import), ``tools`` (tui, demo). They reach the cache through ``agent.client``'s backend.

Exit codes (``agent.errors``): 0 ok, 1 other error, 2 usage or configuration, 3 not
found, 4 no reachable source, 5 integrity, 6 disk full, 7 credentials rejected,
8 store busy, 130 interrupted (verified chunks are kept; run the same command again).
"""

from __future__ import annotations

import argparse
import json
import sys

from agent import __version__
from agent.cli import assign, cache, daemon, launch, publish, room, tools
from agent.config import ENV_NAMES
from agent.errors import ShoalError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Peer-to-peer model cache: verified, resumable, parallel model pulls.",
        epilog="Settings come from ~/.config/shoal/config.toml and the environment: "
               + ", ".join(sorted(ENV_NAMES.values())) + ". See the README.")
    parser.add_argument("--cache-dir", help=f"where models and the index live (${ENV_NAMES['cache_dir']})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cache, daemon, launch, publish, room, assign, tools):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.logs import configure
    configure(args.verbose)
    try:
        return args.func(args)
    except ShoalError as e:
        print(f"\nshoal: {e.title}: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"event": "error", "exit_code": e.exit_code, "title": e.title,
                              "message": str(e)}), flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nshoal: interrupted; verified chunks are kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except (ConnectionError, TimeoutError) as e:
        print(f"\nshoal: Agent unreachable: lost the connection to the agent ({e}); "
              "check `shoal status` or its log", file=sys.stderr)
        return 4
