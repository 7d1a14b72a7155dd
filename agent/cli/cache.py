"""Cache commands: pull, ls, verify, rm, pin, unpin, gc, du, cancel.

Each works with or without a running agent: it asks the backend (``agent.client``),
which is the agent when one serves the cache and this process otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.cli.common import add_ref_argument, backend_of, model_table, ref_of, settings_of, table
from agent.config import ENV_NAMES
from agent.errors import IntegrityError, UsageError
from agent.progress import human_bytes


def cmd_pull(args) -> int:
    from agent.client import open_backend
    from agent.reporter import PullReporter
    settings = settings_of(args)
    if args.no_modelscope:
        settings = settings.with_(use_modelscope=False)
    ref = ref_of(args)
    backend = open_backend(settings)
    if args.fresh and args.no_modelscope:
        raise UsageError("--fresh takes upstream's files from ModelScope: it cannot go with --no-modelscope")
    if args.no_modelscope and backend.kind == "agent":
        raise UsageError("--no-modelscope applies to in-process pulls; the agent uses its own sources "
                         "(set SHOAL_USE_MODELSCOPE=0 in its config)")
    reporter = PullReporter(ref, json_mode=args.json)
    if args.fresh and args.offline:
        raise UsageError("--fresh asks upstream for its current files: it cannot go with --offline")
    reporter.finish(backend.pull(ref, to=Path(args.to) if args.to else None, on_event=reporter.event,
                                 fresh=args.fresh, offline=args.offline))
    return 0


def cmd_import(args) -> int:
    from agent.client import open_backend
    from agent.reporter import PullReporter
    from agent.manifest import ModelRef
    settings = settings_of(args)
    ref = ModelRef.parse(args.as_, dataset=args.dataset)
    source = Path(args.dir)
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder to import from")
    reporter = PullReporter(ref, json_mode=args.json)
    reporter.finish(open_backend(settings).import_dir(ref, source.resolve(), move=args.move, on_event=reporter.event))
    return 0


def cmd_ls(args) -> int:
    models = backend_of(args).models()
    if args.datasets or args.models:
        models = [m for m in models if (m.get("kind") == "dataset") == bool(args.datasets)]
    if args.json:
        print(json.dumps(models, indent=2))
    elif not models:
        print("no models or datasets in the cache yet; try `shoal pull OWNER/NAME` (a model) or "
              "`shoal pull --dataset OWNER/NAME`")
    else:
        model_table(models)
    return 0


def cmd_verify(args) -> int:
    from agent.verify import verify_model
    report = verify_model(ref_of(args), settings_of(args))
    for line in report.lines():
        print(line)
    if report.damaged:
        raise IntegrityError(f"{report.ref}: {len(report.damaged)} file(s) damaged; the damaged chunks "
                             f"were dropped from the index: run `shoal pull {report.ref}` to repair them")
    return 0


def cmd_rm(args) -> int:
    ref = ref_of(args)
    row = backend_of(args).remove(ref)
    print(f"removed {ref} ({human_bytes(row['size'])}) from {row['dir']}")
    return 0


def cmd_pin(args) -> int:
    ref, pinned = ref_of(args), args.command == "pin"
    backend_of(args).set_pinned(ref, pinned)
    print(f"{ref} is {'pinned: never evicted' if pinned else 'unpinned: evictable when the cache is full'}")
    return 0


def cmd_gc(args) -> int:
    backend = backend_of(args)
    evicted, quota = backend.gc(), backend.settings.quota
    if not quota and not evicted:
        print("no quota is set (SHOAL_QUOTA), so nothing is evicted; `shoal rm` removes a model")
    for m in evicted:
        print(f"evicted {m['model']}@{m['revision']} ({human_bytes(m['size'])})")
    if quota and not evicted:
        print("nothing to evict: the cache is below its low watermark (or the rest is pinned or in use)")
    return 0


def cmd_du(args) -> int:
    backend = backend_of(args)
    usage = backend.usage()
    # The quota as this command's settings see it (the agent's own is in `shoal status`).
    quota, models = backend.settings.quota, usage["models"]
    total = usage["usage_bytes"]  # on disk, each file once however many models link it
    if args.json:
        print(json.dumps({**usage, "quota_bytes": quota}, indent=2))
        return 0
    rows = [("MODEL", "SIZE", "OWN", "PINNED", "LAST USED")]
    for m in sorted(models, key=lambda m: -m["size"]):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["last_used"])) if m["last_used"] else "-"
        rows.append((f"{m['model']}@{m['revision']}", human_bytes(m["size"]), human_bytes(m.get("unique", m["size"])),
                     "yes" if m["pinned"] else "", used))
    table(rows)
    share = f" of {human_bytes(quota)} quota ({100 * total / quota:.0f}%)" if quota else ""
    shared = usage.get("logical_bytes", total) - total
    print(f"total {human_bytes(total)} on disk{share}"
          + (f"; {human_bytes(shared)} more is shared between models (kept once)" if shared > 0 else ""))
    print("OWN: what removing the model would free (files no other model or revision shares)")
    for m in models:
        if m.get("room"):  # agent.assign.keeper: the room's copies
            print(f"{m['model']}@{m['revision']}: {m['room']}")
    return 0


def cmd_cancel(args) -> int:
    from agent.launcher.jobs import JobStore, is_job_id
    settings = settings_of(args)
    if is_job_id(settings.cache_dir, args.target):
        job = JobStore(settings.cache_dir).cancel(args.target)
        print(f"job {job.id} is {job.state}")
        return 0
    backend_of(args, need_agent=True).call("cancel", {"model": str(ref_of(args, "target"))})
    print(f"cancelled the pull of {args.target}; verified chunks are kept")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="fetch a model (or --dataset) revision: the room, the OSS mirror, "
                                    "then ModelScope")
    add_ref_argument(p)
    p.add_argument("--to", metavar="DIR", help="put the files in DIR instead of the cache's model folder")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout, for scripts")
    p.add_argument("--concurrency", type=int, help=f"chunks in flight (${ENV_NAMES['concurrency']}, default 8)")
    p.add_argument("--bucket", help=f"OSS mirror bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--no-modelscope", action="store_true", help="never fall back to ModelScope")
    p.add_argument("--fresh", action="store_true",
                   help="upstream's current files (ModelScope's listing), not the OSS mirror's copy")
    p.add_argument("--offline", action="store_true",
                   help=f"ask no origin (mirror, hub): the cache and the room only (${ENV_NAMES['offline']}=1)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("import", help="adopt a folder's files (a hub cache snapshot, any copy) as a model or "
                                      "--dataset: each is hashed, what matches the origin is kept, the rest fetched")
    p.add_argument("dir", metavar="DIR", help="the folder holding the files (symbolic links are followed)")
    p.add_argument("--as", dest="as_", metavar="OWNER/NAME[@REVISION]", required=True,
                   help="the model (or dataset) the folder holds")
    p.add_argument("--dataset", action="store_true", help="the folder is a dataset repository")
    p.add_argument("--move", action="store_true", help="move matching files into the cache (default: hard-link "
                                                      "them where the cache's file system can, else copy)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout, for scripts")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ls", help="list cached models and datasets with size and completeness")
    p.add_argument("--json", action="store_true")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--datasets", action="store_true", help="only datasets")
    only.add_argument("--models", action="store_true", help="only models")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help="re-hash a cached model (or --dataset) and report any damage")
    add_ref_argument(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rm", help="remove a cached model (or --dataset)")
    add_ref_argument(p)
    p.set_defaults(func=cmd_rm)

    for name, text in (("pin", "never evict a cached model"), ("unpin", "let a cached model be evicted")):
        p = sub.add_parser(name, help=text)
        add_ref_argument(p)
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("gc", help="evict least recently used unpinned models down to the low watermark")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("du", help="disk use of the cache by model, against the quota")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_du)

    p = sub.add_parser("cancel", help="stop a job (by id) or a pull the agent is running (by model)")
    add_ref_argument(p, "target", "JOB|OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_cancel)
