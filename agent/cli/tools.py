"""The terminal UI and the demo: tui, demo."""

from __future__ import annotations

from pathlib import Path

from agent.cli.common import settings_of
from agent.errors import UsageError


def cmd_tui(args) -> int:
    try:
        from tui.app import run_tui
    except ImportError as e:
        raise UsageError(f"the terminal UI needs Textual ({e.name}): pip install shoal") from None
    flags = {k: v for k, v in (("model_type", args.model_type), ("template", args.template)) if v}
    return run_tui(settings_of(args), flags)


def cmd_demo(args) -> int:
    from agent.demo import run_demo, run_lan_demo
    demo = run_lan_demo if args.lan else run_demo
    return demo(size_mb=args.size_mb, workdir=Path(args.workdir) if args.workdir else None, keep=args.keep)


def register(sub) -> None:
    p = sub.add_parser("tui", help="the terminal UI: browse, pull, watch, chat, train")
    p.add_argument("--model-type", help="ms-swift model type for chats and training started from the UI")
    p.add_argument("--template", help="ms-swift chat template for chats and training started from the UI")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("demo", help="run a complete pull against local OSS and ModelScope servers")
    p.add_argument("--size-mb", type=int, default=256, help="size of the generated model (default 256)")
    p.add_argument("--workdir", help="keep servers' data and the cache here (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp folder")
    p.add_argument("--lan", action="store_true",
                   help="a classroom instead: a teacher's agent seeds, students' agents pull over the LAN swarm")
    p.set_defaults(func=cmd_demo)
