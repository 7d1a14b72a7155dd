"""``shoal mirror push``: fill the lab's OSS mirror with a model revision.

The source is either ModelScope (the revision is pulled into the local cache first, so
every byte is proven against the origin's SHA-256 before it is uploaded) or a local
directory (hashed here; use it for a lab's own fine-tunes). Files go up with oss2's
resumable multipart upload, each tagged with its SHA-256 (``x-oss-meta-sha256``) so a
re-run skips what is already there; the manifest is written last (see
``agent.sources.oss`` for the layout), so a half-pushed revision is never used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import oss2

from agent.config import Settings
from agent.errors import NotFound, ShoalError, UsageError
from agent.manifest import (FileEntry, Manifest, ModelRef, build_manifest, check_relpath,
                            default_chunk_size)
from agent.sources.oss import ARCHIVE_CLASSES, file_key, make_bucket, manifest_key, translate_oss_error
from agent.hashing import hash_file

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
UPLOAD_THREADS = 4


@dataclass
class PushResult:
    ref: ModelRef
    manifest_id: str
    uploaded: list[str]
    skipped: list[str]


def manifest_from_dir(ref: ModelRef, directory: Path, chunk_size: int | None = None,
                      only: set[str] | None = None) -> Manifest:
    """Hash a local model directory into a manifest (blocking; BLAKE3 and SHA-256 in one read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
    rel = [p.relative_to(directory).as_posix() for p in paths]
    if only is not None:
        pairs = [(p, r) for p, r in zip(paths, rel) if r in only]
    else:
        pairs = list(zip(paths, rel))
    for _, r in pairs:
        check_relpath(r)
    size = chunk_size or default_chunk_size(sum(p.stat().st_size for p, _ in pairs))
    files = []
    for path, r in pairs:
        chunks, sha = hash_file(path, size)
        files.append(FileEntry(r, path.stat().st_size, sha, tuple(chunks)))
    return build_manifest(ref.model_id, ref.revision, size, files)


def push_directory(ref: ModelRef, directory: Path, settings: Settings, manifest: Manifest,
                   *, bucket_name: str | None = None, only: set[str] | None = None,
                   on_file: Callable[[str, str], None] = lambda path, what: None) -> PushResult:
    """Upload ``directory`` (described by ``manifest``) to the mirror; manifest object last.

    ``only``: upload just these files, still writing the whole manifest: a mirror that
    lacks some files, as a sync cut short leaves it (the demo and the tests use this).
    """
    bucket = make_bucket(settings, bucket_name, pool_size=UPLOAD_THREADS + 2)
    anonymous = not settings.oss_access_key_id
    uploaded, skipped = [], []
    checkpoints = Path(settings.cache_dir) / "upload-checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        for entry in manifest.files:
            if only is not None and entry.path not in only:
                continue
            key = file_key(settings.oss_prefix, ref, entry.path)
            what = f"uploading {entry.path} to oss://{bucket.bucket_name}/{key}"
            try:
                try:
                    head = bucket.head_object(key)
                    if (head.content_length == entry.size
                            and head.headers.get("x-oss-meta-sha256") == entry.sha256.hex()):
                        skipped.append(entry.path)
                        on_file(entry.path, "already in the mirror")
                        continue
                except oss2.exceptions.NotFound:
                    pass
                oss2.resumable_upload(
                    bucket, key, str(directory / entry.path),
                    store=oss2.ResumableStore(root=str(checkpoints)),
                    headers={"x-oss-meta-sha256": entry.sha256.hex()},
                    multipart_threshold=MULTIPART_THRESHOLD, part_size=PART_SIZE,
                    num_threads=UPLOAD_THREADS)
            except (oss2.exceptions.OssError, OSError) as e:
                raise translate_oss_error(e, what, anonymous=anonymous) from e
            uploaded.append(entry.path)
            on_file(entry.path, "uploaded")
        key = manifest_key(settings.oss_prefix, ref)
        try:
            bucket.put_object(key, manifest.encode(), headers={"Content-Type": "application/x-shoal-manifest"})
        except (oss2.exceptions.OssError, OSError) as e:
            raise translate_oss_error(e, f"writing the manifest {key}", anonymous=anonymous) from e
    finally:
        bucket.session.session.close()
    return PushResult(ref, manifest.id, uploaded, skipped)


def check_push_target(settings: Settings, bucket_name: str | None) -> None:
    if not (bucket_name or settings.oss_bucket):
        raise UsageError("mirror push needs a bucket: --bucket NAME or SHOAL_OSS_BUCKET")
    if not settings.oss_endpoint:
        raise UsageError("mirror push needs OSS_ENDPOINT, e.g. https://oss-cn-hangzhou.aliyuncs.com")
    if not settings.oss_access_key_id and settings.oss_credentials != "chain":
        raise UsageError("mirror push writes to the bucket: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET "
                         "(or an STS token with OSS_SESSION_TOKEN) of a key allowed to write it")


def mirror_status(ref: ModelRef, settings: Settings) -> list[dict]:
    """Each file of ``ref``'s mirrored revision: its size, storage class and restore state
    (``shoal mirror status``): one HEAD per file, nothing read."""
    from agent.manifest import decode
    from agent.sources.oss import OssSource
    source = OssSource(settings)
    try:
        data = source.get_manifest(ref)
        if data is None:
            raise NotFound(f"{ref} is not in the OSS mirror (no {manifest_key(settings.oss_prefix, ref)})")
        manifest = decode(data)
        rows = []
        for entry in manifest.files:
            head = source.head_file(ref, entry.path)
            if head is None:
                rows.append({"path": entry.path, "size": entry.size, "storage_class": None, "restore": "missing"})
                continue
            storage = head.headers.get("x-oss-storage-class", "Standard")
            restore = head.headers.get("x-oss-restore")
            if storage not in ARCHIVE_CLASSES:
                state = "readable"
            elif restore is None:
                state = "archived (not restored)"
            elif 'ongoing-request="true"' in restore:
                state = "restoring"
            else:
                state = "restored" + (f" until {restore.split('expiry-date=', 1)[1].strip(chr(34))}"
                                      if "expiry-date=" in restore else "")
            rows.append({"path": entry.path, "size": entry.size, "storage_class": storage, "restore": state})
        return rows
    finally:
        source.close()


__all__ = ["PushResult", "check_push_target", "manifest_from_dir", "mirror_status", "push_directory", "ShoalError"]
