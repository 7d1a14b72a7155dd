"""Publishing: id, publish (sign a manifest), mirror push (fill the lab's OSS mirror)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from agent.cli.common import add_ref_argument, ref_of, settings_of
from agent.config import ENV_NAMES
from agent.errors import UsageError


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
    ref = ref_of(args)
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
    ref = ref_of(args)
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


def _mirror_settings(args, command: str, *, writes: bool = False):
    """The settings with ``--bucket`` applied; a clear error when there is no bucket (and,
    for a command that writes, no endpoint or write credentials)."""
    settings = settings_of(args)
    if getattr(args, "bucket", None):
        settings = settings.with_(oss_bucket=args.bucket)
    if writes:
        from agent.mirror import check_push_target
        check_push_target(settings, None)
    elif not settings.oss_bucket:
        raise UsageError(f"mirror {command} needs a bucket: --bucket NAME or SHOAL_OSS_BUCKET")
    return settings


def cmd_mirror_status(args) -> int:
    from agent.mirror import mirror_status
    from agent.progress import human_bytes
    settings = _mirror_settings(args, "status")
    ref = ref_of(args)
    rows = mirror_status(ref, settings)
    if args.json:
        print(json.dumps({"model": str(ref), "files": rows}, indent=2))
        return 0
    width = max([len(r["path"]) for r in rows] + [4])
    print(f"{'file':<{width}}  {'size':>9}  {'class':<12}  state")
    for r in rows:
        print(f"{r['path']:<{width}}  {human_bytes(r['size']):>9}  {r['storage_class'] or '-':<12}  {r['restore']}")
    return 0


def cmd_mirror_sync(args) -> int:
    from agent.mirrorsync import read_sync_file, run_sync
    from agent.progress import human_bytes
    settings = _mirror_settings(args, "sync", writes=True)
    plan = read_sync_file(Path(args.file))

    def say(outcome) -> None:
        if args.json:
            return
        if outcome.status == "failed":
            print(f"{outcome.model}: FAILED: {outcome.error}", file=sys.stderr)
            return
        detail = (f"{len(outcome.uploaded)} uploaded ({human_bytes(outcome.uploaded_bytes)}), "
                  f"{len(outcome.copied)} copied inside OSS, {len(outcome.kept)} already there"
                  if outcome.status != "unchanged" else "upstream unchanged")
        dropped = f"; removed {', '.join(outcome.deleted)}" if outcome.deleted else ""
        print(f"{outcome.model}: {outcome.status} -> {outcome.snapshot} ({detail}){dropped}")
    outcomes = run_sync(plan, settings, on_outcome=say)
    if args.json:
        print(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=2))
    failed = [o for o in outcomes if o.status == "failed"]
    if not args.json:
        print(f"{len(outcomes)} models: {sum(o.status in ('new', 'updated') for o in outcomes)} synced, "
              f"{sum(o.status == 'unchanged' for o in outcomes)} unchanged, {len(failed)} failed")
    return 4 if failed else 0


def cmd_mirror_policy(args) -> int:
    from agent.mirrorsync import read_only_policy
    settings = _mirror_settings(args, "policy")
    print(json.dumps(read_only_policy(settings.oss_bucket, settings.oss_prefix, restore=args.restore), indent=2))
    return 0


def cmd_mirror_lifecycle(args) -> int:
    from agent.mirrorsync import lifecycle_rules
    from agent.sources.oss import make_bucket, translate_oss_error
    import oss2
    settings = _mirror_settings(args, "lifecycle", writes=True)
    rules = lifecycle_rules(settings.oss_prefix, args.ia_after, args.archive_after)
    bucket = make_bucket(settings)
    try:
        bucket.put_bucket_lifecycle(oss2.models.BucketLifecycle(rules))
    except (oss2.exceptions.OssError, OSError) as e:
        raise translate_oss_error(e, "setting the bucket's lifecycle rules",
                                  anonymous=not settings.oss_access_key_id) from e
    finally:
        bucket.session.session.close()
    archive = f", Archive after {args.archive_after} days" if args.archive_after else ""
    print(f"oss://{settings.oss_bucket}/{settings.oss_prefix}: superseded snapshots move to IA after "
          f"{args.ia_after} days{archive}; the current snapshot of each model stays Standard")
    return 0


def register(sub) -> None:
    p = sub.add_parser("id", help="this agent's publisher key (give it to those who should trust what you publish)")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("publish", help="sign a cached model's manifest with this agent's key")
    add_ref_argument(p)
    p.set_defaults(func=cmd_publish)

    mirror = sub.add_parser("mirror", help="manage the lab's OSS mirror")
    msub = mirror.add_subparsers(dest="mirror_command", required=True, metavar="COMMAND")
    p = msub.add_parser("push", help="upload a model revision and its manifest to the mirror")
    add_ref_argument(p)
    p.add_argument("--bucket", help=f"target bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--from-dir", metavar="DIR", help="upload this local directory instead of pulling from ModelScope")
    p.set_defaults(func=cmd_mirror_push)
    p = msub.add_parser("status", help="each mirrored file's storage class and restore state")
    add_ref_argument(p)
    p.add_argument("--bucket", help=f"the mirror's bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mirror_status)
    p = msub.add_parser("sync", help="the daily job: bring every model of a sync file up to date with ModelScope",
                        description="FILE (TOML): keep = 3, then one [[model]] table per model (or [[dataset]] per "
                                    "dataset): id = \"OWNER/NAME\", revision = \"master\". Only changed files are downloaded and uploaded; "
                                    "the last KEEP synced copies of each are kept.")
    p.add_argument("file", metavar="FILE.toml")
    p.add_argument("--bucket", help=f"the mirror's bucket (${ENV_NAMES['oss_bucket']})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mirror_sync)
    p = msub.add_parser("policy", help="print the RAM policy that lets students' STS role read the mirror")
    p.add_argument("--read-only", action="store_true", required=True, help="read the mirror prefix and nothing else")
    p.add_argument("--restore", action="store_true", help="also restore archived objects (oss.restore)")
    p.add_argument("--bucket", help=f"the mirror's bucket (${ENV_NAMES['oss_bucket']})")
    p.set_defaults(func=cmd_mirror_policy)
    p = msub.add_parser("lifecycle", help="move superseded synced snapshots to cheaper storage classes")
    p.add_argument("--ia-after", type=int, default=30, metavar="DAYS")
    p.add_argument("--archive-after", type=int, default=180, metavar="DAYS")
    p.add_argument("--bucket", help=f"the mirror's bucket (${ENV_NAMES['oss_bucket']})")
    p.set_defaults(func=cmd_mirror_lifecycle)
