"""Publishing: id, publish (sign a manifest), mirror push (fill the lab's OSS mirror)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from agent.cli.common import settings_of
from agent.config import ENV_NAMES
from agent.errors import UsageError
from agent.manifest import ModelRef


def cmd_id(args) -> int:
    from agent.swarm.trust import Identity
    identity = Identity.load_or_create(Path(settings_of(args).cache_dir) / "identity.key")
    print(identity.publisher_id)
    return 0


def cmd_publish(args) -> int:
    """Sign a complete model's manifest with this agent's key (the teacher's machine)."""
    from agent.store import Store
    from agent.swarm.trust import Identity
    settings = settings_of(args)
    ref = ModelRef.parse(args.model)
    identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
    store = Store(settings.cache_dir)
    try:
        info = store.find(ref)
        if info.state != "complete" or not info.manifest_id:
            raise UsageError(f"{ref} is not complete here; pull it first (`shoal pull {ref}`), then publish")
        store.save_signature(info.manifest_id, identity.sign_manifest(info.manifest_id))
    finally:
        store.close()
    print(f"published {ref}: manifest {info.manifest_id}\nsigned by {identity.publisher_id}\n"
          f"students trust it with SHOAL_TRUSTED_PUBLISHERS={identity.publisher_id}")
    return 0


def cmd_mirror_push(args) -> int:
    from agent.client import LocalBackend
    from agent.mirror import check_push_target, manifest_from_dir, push_directory
    settings = settings_of(args)
    check_push_target(settings, args.bucket)
    ref = ModelRef.parse(args.model)
    if args.from_dir:
        directory = Path(args.from_dir)
        print(f"hashing {directory} ...", file=sys.stderr)
        manifest = manifest_from_dir(ref, directory, settings.chunk_size)
    else:
        # Pull from ModelScope only (never from the mirror we are filling), proving every
        # file against the origin's SHA-256, then upload what was proven.
        from agent.reporter import PullReporter
        from agent.store import Store
        origin = dataclasses.replace(settings, oss_bucket=None, use_modelscope=True)
        reporter = PullReporter(ref, json_mode=False)
        result = LocalBackend(origin).pull(ref, on_event=reporter.event)
        reporter.finish(result)
        store = Store(settings.cache_dir)
        try:
            manifest = store.manifest(result["manifest_id"])
        finally:
            store.close()
        directory = Path(result["directory"])
    pushed = push_directory(ref, directory, settings, manifest, bucket_name=args.bucket,
                            on_file=lambda path, what: print(f"  {path}: {what}", file=sys.stderr))
    print(f"mirrored {ref} to oss://{args.bucket or settings.oss_bucket}/ "
          f"({len(pushed.uploaded)} uploaded, {len(pushed.skipped)} already there); manifest {pushed.manifest_id}")
    return 0


def cmd_mirror_status(args) -> int:
    from agent.mirror import mirror_status
    from agent.progress import human_bytes
    settings = settings_of(args)
    if args.bucket:
        settings = settings.with_(oss_bucket=args.bucket)
    if not settings.oss_bucket:
        raise UsageError("mirror status needs a bucket: --bucket NAME or SHOAL_OSS_BUCKET")
    ref = ModelRef.parse(args.model)
    rows = mirror_status(ref, settings)
    if args.json:
        print(json.dumps({"model": str(ref), "files": rows}, indent=2))
        return 0
    width = max([len(r["path"]) for r in rows] + [4])
    print(f"{'file':<{width}}  {'size':>9}  {'class':<12}  state")
    for r in rows:
        print(f"{r['path']:<{width}}  {human_bytes(r['size']):>9}  {r['storage_class'] or '-':<12}  {r['restore']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("id", help="this agent's publisher key (give it to those who should trust what you publish)")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("publish", help="sign a cached model's manifest with this agent's key")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.set_defaults(func=cmd_publish)

    mirror = sub.add_parser("mirror", help="manage the lab's OSS mirror")
    msub = mirror.add_subparsers(dest="mirror_command", required=True, metavar="COMMAND")
    p = msub.add_parser("push", help="upload a model revision and its manifest to the mirror")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.add_argument("--bucket", help=f"target bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--from-dir", metavar="DIR", help="upload this local directory instead of pulling from ModelScope")
    p.set_defaults(func=cmd_mirror_push)
    p = msub.add_parser("status", help="each mirrored file's storage class and restore state")
    p.add_argument("model", metavar="OWNER/NAME[@REVISION]")
    p.add_argument("--bucket", help=f"the mirror's bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mirror_status)
