"""A room's assignments from the command line (``agent.assign``): room push, retract,
assignments, refuse, status. Registered under ``shoal room`` (``agent.cli.room``)."""

from __future__ import annotations

import json
import time

from agent.cli.common import backend_of, table
from agent.progress import human_bytes


def _call(args, name: str, params: dict | None = None):
    return backend_of(args, need_agent=True).call(name, params or {})


def _add_items(p) -> None:
    """MODEL..., --dataset, --adapter: what a push or a bundle carries."""
    p.add_argument("model", nargs="*", metavar="OWNER/NAME[@REV]")


def _add_kinds(p) -> None:
    p.add_argument("--dataset", action="append", default=[], metavar="OWNER/NAME[@REV]")
    p.add_argument("--adapter", action="append", default=[], metavar="OWNER/NAME+lora/ADAPTER")


def _items(args) -> list[tuple[str, str]]:
    """(ref as typed, kind) of what the command names."""
    return ([(r, "model") for r in args.model] + [(r, "dataset") for r in args.dataset]
            + [(r, "adapter") for r in args.adapter])


def cmd_room_push(args) -> int:
    items = [{"ref": ref, "kind": kind} for ref, kind in _items(args)]
    record = _call(args, "room_push", {"items": items, "at": args.at, "by": args.by})
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"assignment record #{record['seq']} signed by {record['publisher'][:16]}… handed to the room:")
    _print_items(record["items"])
    print("`shoal room status` shows each member's progress")
    return 0


def cmd_room_retract(args) -> int:
    record = _call(args, "room_retract", {"refs": args.model})
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"assignment record #{record['seq']}: {', '.join(args.model)} retracted (members unpin them); still assigned:")
    _print_items(record["items"])
    return 0


def _print_items(items: list[dict]) -> None:
    if not items:
        print("  nothing")
    for item in items:
        when = " ".join(x for x in (f"at {item['at']}" if item["at"] else "", f"by {item['by']}" if item["by"] else "")
                        if x)
        print(f"  {item['kind']:8} {item['ref']}{'  ' + when if when else ''}")


def cmd_room_assignments(args) -> int:
    held = _call(args, "room_assignments")
    if args.json:
        print(json.dumps(held, indent=2))
        return 0
    record = held["record"]
    if record is None:
        print("no assignments from the room's teacher yet")
    else:
        print(f"assignment record #{record['seq']} from {record['publisher'][:16]}… "
              f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(record['issued']))}):")
        rows = [("ASSIGNED", "KIND", "STATE", "HAVE", "DETAIL")]
        for item in record["items"]:
            state = held["items"].get(item["ref"], {})
            have = (f"{human_bytes(state.get('have', 0))}/{human_bytes(state['total'])}" if state.get("total")
                    else "-")
            detail = state.get("detail", "") or held["keeps"].get(item["ref"], "")
            rows.append((item["ref"], item["kind"], state.get("state", "?"), have, detail))
        table(rows)
    if not held["accepting"]:
        print("this machine takes no assignments (room.accept_assignments = false)")
    for line in held["refusals"]:
        print(f"refused a record {line}")
    return 0


def cmd_room_refuse(args) -> int:
    answer = _call(args, "room_refuse", {"model": args.model, "undo": args.undo})
    print(f"{answer['model']}: {'refused on this machine' if answer['refused'] else 'taken again'}")
    return 0


def cmd_room_status(args) -> int:
    while True:
        view = _call(args, "room_status")
        if args.json:
            print(json.dumps(view, indent=2))
            return 0
        _print_status(view)
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def _print_status(view: dict) -> None:
    bound = view["bound"]
    if not view["assignments"]:
        print("nothing assigned to the room: `shoal room push MODEL` assigns")
    eta = "-" if bound["eta_s"] is None else f"{bound['eta_s']:.0f} s"
    print(f"record #{view['seq']}: {bound['members']} members, {human_bytes(bound['bytes'])} assigned, "
          f"{100 * bound['done']:.0f}% done in {bound['elapsed_s']:.0f} s, ETA {eta} "
          f"(bound {bound['t_min_s']:.0f} s on {bound['link_mbit']:g} Mbit/s links)")
    for a in view["assignments"]:
        sources = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(a["by_source"].items())) or "nothing fetched"
        print(f"  {a['ref']}: {a['complete']}/{a['members']} complete, {a['percent']:.0f}% ({sources})")
    rows = [("MEMBER", "ADDRESS", "FOUND", "ONLINE") + tuple(a["ref"] for a in view["assignments"])]
    for m in view["members"]:
        rows.append((m["name"], m["addr"] or "-", m["via"] or "-", "yes" if m["online"] else "no")
                    + tuple(f"{m['items'][a['ref']]['state']} {m['items'][a['ref']]['percent']:.0f}%"
                            for a in view["assignments"]))
    table(rows)
    for s in view["stuck"]:
        print(f"  stuck: {s['member']} ({s['id'][:12]}…) {s['ref']}: {s['why']}")


def register_room(rsub) -> None:
    p = rsub.add_parser("push", help="the teacher: assign models, datasets, adapters to every machine of the room")
    _add_items(p)
    _add_kinds(p)
    p.add_argument("--at", metavar="HH:MM", help="members start then (the next such time)")
    p.add_argument("--by", metavar="HH:MM", help="wanted by then (room status names who is late)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_room_push)
    p = rsub.add_parser("retract", help="the teacher: take assignments back (members unpin them)")
    p.add_argument("model", nargs="+", metavar="OWNER/NAME[@REV]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_room_retract)
    p = rsub.add_parser("assignments", help="what the room's teacher assigned, and how it stands on this machine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_room_assignments)
    p = rsub.add_parser("refuse", help="refuse an assignment on this machine (--undo takes it again)")
    p.add_argument("model", metavar="OWNER/NAME[@REV]")
    p.add_argument("--undo", action="store_true")
    p.set_defaults(func=cmd_room_refuse)
    p = rsub.add_parser("status", help="the room from the teacher's seat: members, progress, who is stuck")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS")
    p.set_defaults(func=cmd_room_status)


# ------------------------------------------------------------------ offline bundles

def cmd_bundle_export(args) -> int:
    from pathlib import Path

    from agent.bundle import export_bundle
    from agent.cli.common import settings_of
    from agent.manifest import ModelRef
    from agent.store import Store
    from agent.swarm.trust import Identity
    settings = settings_of(args)
    refs = [(ModelRef.parse(r, dataset=kind == "dataset"), kind) for r, kind in _items(args)]
    if not refs:
        from agent.errors import UsageError
        raise UsageError("name what the bundle carries: MODEL..., --dataset NAME, --adapter NAME")
    assignment = None
    from agent.client import AgentBackend
    backend = AgentBackend.connect(settings)
    if backend is not None and not args.no_assignment:  # the room's record, as the agent holds it
        try:
            held = backend.call("room_assignments")
            assignment = bytes.fromhex(held["envelope"]) if held.get("envelope") else None
        except Exception:  # no room: a bundle of files alone
            assignment = None
    store = Store(settings.cache_dir)
    try:
        identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
        done = export_bundle(store, identity, refs, Path(args.dir).resolve(), assignment)
    finally:
        store.close()
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    print(f"bundle {done['dir']}: {len(done['items'])} revision(s), {human_bytes(done['bytes'])}"
          f"{', the room assignment record' if done['assignment'] else ''}; signed by {identity.publisher_id[:16]}…")
    print("on each machine: shoal bundle import DIR (it checks every chunk against the signed manifests)")
    return 0


def cmd_bundle_import(args) -> int:
    from pathlib import Path

    from agent.cli.common import settings_of
    from agent.client import AgentBackend, open_backend
    settings = settings_of(args)
    source = str(Path(args.dir).resolve())
    backend = open_backend(settings)
    if isinstance(backend, AgentBackend):
        done = backend.call("bundle_import", {"dir": source})
    else:
        done = backend.import_bundle(Path(source))
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    for item in done["items"]:
        print(f"{item['ref']}: in the cache ({human_bytes(item['imported_bytes'])} from the bundle)"
              f"{', pinned: the room assigns it' if item['pinned'] else ''}")
    return 0


def register(sub) -> None:
    bundle = sub.add_parser("bundle", help="offline bundles: a room's models on a USB stick")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    p = bsub.add_parser("export", help="write models (and the room's assignment) to a folder")
    _add_items(p)
    p.add_argument("dir", metavar="DIR")
    _add_kinds(p)
    p.add_argument("--no-assignment", action="store_true", help="leave the room's assignment record out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bundle_export)
    p = bsub.add_parser("import", help="check a bundle (signatures, every chunk) and add it to the cache")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bundle_import)
