"""``shoal mirror sync``: keep the lab's OSS mirror in step with ModelScope (the daily job).

The sync file (TOML) names what the mirror carries::

    keep = 3                                   # synced copies kept per model revision
    [[model]]
    id = "qwen/Qwen2.5-0.5B-Instruct"
    revision = "master"                        # a branch or tag; default master

For each model: one listing call to ModelScope (paths, sizes, SHA-256). The modelscope
SDK exposes no commit id for a branch, so the listing's *fingerprint* (SHA-256 over its
sorted path/size/SHA-256 lines) is what identifies the upstream state: unchanged
fingerprint, nothing to do (the pointer records when it was checked). Otherwise a new
snapshot folder ``{revision}~{first 16 hex of the fingerprint}`` is filled:

- a file already there with its SHA-256 tag (a sync cut short): kept;
- a file an older snapshot holds with the same SHA-256: copied inside OSS (no download,
  no upload: CopyObject, or UploadPartCopy above 1 GiB);
- any other file: downloaded from ModelScope chunk by chunk into a temporary file, proven
  against the listing's SHA-256, uploaded resumably with its SHA-256 tag.

Then, in this order, each one PUT: the snapshot's manifest, its ``sync.json`` record
(when, from which endpoint and fingerprint, what was uploaded or copied), and the
revision's pointer ``current.json`` (``agent.sources.oss``): a sync killed at any moment
leaves the pointer on a complete snapshot, and a re-run resumes the same folder. Last,
snapshots beyond the newest ``keep`` are deleted (never the current one) and the
superseded ones are tagged ``shoal-state=superseded`` for the lifecycle rules
(``shoal mirror lifecycle``) to move to cheaper storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import oss2

from agent import crashpoints
from agent.config import Settings
from agent.errors import ConfigError, IntegrityError, ShoalError, SourceUnavailable, UsageError
from agent.hashing import blake3_hash
from agent.manifest import FileEntry, Listing, ModelRef, build_manifest, chunk_count, chunk_span, \
    decode, default_chunk_size, files_fingerprint
from agent.sources import ChunkRequest
from agent.sources.oss import (MANIFEST_NAME, file_key, is_snapshot_of, make_bucket, manifest_key,
                               normalise_prefix, pointer_key, revision_prefix, translate_oss_error)

log = logging.getLogger(__name__)

RECORD_NAME = "sync.json"
COPY_PART_THRESHOLD = 1 << 30  # OSS CopyObject takes objects up to 1 GiB; above, UploadPartCopy
COPY_PART_SIZE = 256 << 20
MAX_MODELS = 1000
MAX_KEEP = 100
SUPERSEDED_TAG = ("shoal-state", "superseded")
CHUNK_TRIES = 4


@dataclass(frozen=True)
class SyncEntry:
    ref: ModelRef


@dataclass(frozen=True)
class SyncPlan:
    keep: int
    entries: tuple[SyncEntry, ...]


@dataclass
class SyncOutcome:
    model: str
    status: str  # unchanged | updated | new | failed
    snapshot: str | None = None
    fingerprint: str | None = None
    uploaded: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already in the snapshot (a resumed sync)
    uploaded_bytes: int = 0
    deleted: list[str] = field(default_factory=list)  # snapshots removed by `keep`
    error: str | None = None


def read_sync_file(path: Path) -> SyncPlan:
    """The sync file, checked: a clear error names the line's model and what is wrong."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no sync file {path}: write one (see `shoal mirror sync --help`)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the sync file {path}: {e}") from e
    keep = doc.get("keep", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
        raise ConfigError(f"{path}: keep = {keep!r}; it must be a whole number in 1..{MAX_KEEP}")
    models, datasets = doc.get("model", []), doc.get("dataset", [])
    if not isinstance(models, list) or not isinstance(datasets, list) or not models + datasets:
        raise ConfigError(f"{path}: no [[model]] or [[dataset]] tables; add one per repository "
                          "(id = \"OWNER/NAME\")")
    if len(models) + len(datasets) > MAX_MODELS:
        raise ConfigError(f"{path}: {len(models) + len(datasets)} repositories, more than {MAX_MODELS}")
    entries = []
    for kind, items in (("model", models), ("dataset", datasets)):
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise ConfigError(f"{path}: {kind} #{i} has no id = \"OWNER/NAME\"")
            revision = item.get("revision", "master")
            if not isinstance(revision, str) or "~" in revision:
                raise ConfigError(f"{path}: {kind} #{i} ({item['id']}): revision must be a branch or tag name")
            try:
                ref = ModelRef.parse(f"{item['id']}@{revision}", dataset=kind == "dataset")
            except ShoalError as e:
                raise ConfigError(f"{path}: {kind} #{i}: {e}") from e
            entries.append(SyncEntry(ref))
    return SyncPlan(keep, tuple(entries))


def fingerprint(listing: Listing) -> str:
    return files_fingerprint(listing.files)


class MirrorSync:
    """One sync run over a bucket (see module docstring). Blocking; one model at a time."""

    def __init__(self, settings: Settings, *, keep: int, bucket_name: str | None = None,
                 copy_threshold: int = COPY_PART_THRESHOLD):
        from agent.sources.modelscope import ModelScopeSource
        self.settings = settings
        self.keep = keep
        self.bucket = make_bucket(settings, bucket_name, pool_size=8)
        self.origin = ModelScopeSource(dataclasses.replace(settings, concurrency=4))
        self.base = normalise_prefix(settings.oss_prefix)
        self.copy_threshold = copy_threshold
        self.work = Path(settings.cache_dir) / "mirror-sync"
        self.anonymous = not settings.oss_access_key_id and settings.oss_credentials != "chain"

    def close(self) -> None:
        self.origin.close()
        self.bucket.session.session.close()

    # ------------------------------------------------------------------ oss helpers

    def _oss(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (oss2.exceptions.OssError, OSError) as e:
            raise translate_oss_error(e, what, anonymous=self.anonymous) from e

    def _get_json(self, key: str) -> dict | None:
        try:
            return json.loads(self.bucket.get_object(key).read(1 << 20))
        except oss2.exceptions.NoSuchKey:
            return None
        except ValueError:
            return None
        except (oss2.exceptions.OssError, OSError) as e:
            raise translate_oss_error(e, f"reading {key}", anonymous=self.anonymous) from e

    def _put_json(self, key: str, value: dict) -> None:
        self._oss(f"writing {key}", self.bucket.put_object, key, json.dumps(value, indent=1).encode(),
                  headers={"Content-Type": "application/json"})

    def _folder(self, ref: ModelRef, folder: str) -> str:
        return revision_prefix(self.settings.oss_prefix, ref, folder)

    def _snapshots(self, ref: ModelRef) -> list[tuple[str, dict]]:
        """(folder, its sync record) of every complete snapshot of ``ref``, newest first."""
        found = []
        start = f"{self.base}{ref.model_id}/{ref.revision}~"
        try:
            for obj in oss2.ObjectIteratorV2(self.bucket, prefix=start, delimiter="/", max_keys=1000):
                if not obj.is_prefix():
                    continue
                folder = obj.key[len(self.base) + len(ref.model_id) + 1:].rstrip("/")
                if not is_snapshot_of(folder, ref.revision):
                    continue
                record = self._get_json(self._folder(ref, folder) + RECORD_NAME)
                if record is not None:
                    found.append((folder, record))
        except (oss2.exceptions.OssError, OSError) as e:
            raise translate_oss_error(e, f"listing the snapshots of {ref}", anonymous=self.anonymous) from e
        return sorted(found, key=lambda item: item[1].get("synced_at", ""), reverse=True)

    def _head(self, key: str):
        try:
            return self.bucket.head_object(key)
        except oss2.exceptions.NotFound:
            return None
        except (oss2.exceptions.OssError, OSError) as e:
            raise translate_oss_error(e, f"HEAD {key}", anonymous=self.anonymous) from e

    # -------------------------------------------------------------------- the run

    def sync(self, ref: ModelRef) -> SyncOutcome:
        listing = self.origin.list_files(ref)
        fp = fingerprint(listing)
        folder = f"{ref.revision}~{fp[:16]}"
        pointer_at = pointer_key(self.settings.oss_prefix, ref)
        pointer = self._get_json(pointer_at)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if pointer and pointer.get("snapshot") == folder:
            self._put_json(pointer_at, {**pointer, "checked_at": now})
            outcome = SyncOutcome(str(ref), "unchanged", folder, fp)
            self._retain(ref, folder, outcome, self._snapshots(ref))
            return outcome
        outcome = SyncOutcome(str(ref), "updated" if pointer else "new", folder, fp)
        older = self._snapshots(ref)
        chunk_size = self.settings.chunk_size or default_chunk_size(listing.total_size)
        reuse = self._reusable(ref, older, chunk_size)
        entries = []
        for listed in listing.files:
            entries.append(self._file(ref, folder, listed, chunk_size, reuse, outcome))
            crashpoints.reached("sync:file")
        manifest = build_manifest(ref.model_id, ref.revision, chunk_size, entries)
        prefix = self._folder(ref, folder)
        self._oss(f"writing {prefix}{MANIFEST_NAME}", self.bucket.put_object, prefix + MANIFEST_NAME,
                  manifest.encode(), headers={"Content-Type": "application/x-shoal-manifest"})
        self._put_json(prefix + RECORD_NAME, {
            "model": ref.model_id, "revision": ref.revision, "snapshot": folder, "synced_at": now,
            "upstream": {"endpoint": self.settings.modelscope_endpoint, "fingerprint": fp,
                         "files": len(listing.files), "bytes": listing.total_size},
            "manifest_id": manifest.id, "uploaded": outcome.uploaded, "copied": outcome.copied})
        crashpoints.reached("sync:manifest")
        # The switch, last: until here pulls read the previous snapshot.
        self._put_json(pointer_at, {"snapshot": folder, "synced_at": now, "checked_at": now,
                                    "fingerprint": fp, "manifest_id": manifest.id,
                                    "upstream": self.settings.modelscope_endpoint})
        # A manifest `mirror push` left in the revision's own folder would win over the
        # pointer (pulls read it first): the sync owns this revision now.
        stale = manifest_key(self.settings.oss_prefix, ref)
        if self._head(stale) is not None:
            self._oss(f"deleting {stale}", self.bucket.delete_object, stale)
            log.info("%s: removed the manifest `mirror push` wrote; pulls follow the sync's pointer now", ref)
        self._retain(ref, folder, outcome, older)
        return outcome

    def _reusable(self, ref: ModelRef, older: list[tuple[str, dict]], chunk_size: int) -> dict[bytes, tuple]:
        """SHA-256 -> (key, chunk hashes or None) of files older snapshots hold."""
        reuse: dict[bytes, tuple] = {}
        for folder, _ in older:
            key = manifest_key(self.settings.oss_prefix, ref, folder)
            try:
                manifest = decode(self.bucket.get_object(key).read())
            except (oss2.exceptions.OssError, OSError, ShoalError):
                continue
            for entry in manifest.files:
                chunks = entry.chunks if manifest.chunk_size == chunk_size else None
                reuse.setdefault(entry.sha256, (file_key(self.settings.oss_prefix, ref, entry.path, folder), chunks))
        return reuse

    def _file(self, ref: ModelRef, folder: str, listed, chunk_size: int, reuse: dict,
              outcome: SyncOutcome) -> FileEntry:
        key = file_key(self.settings.oss_prefix, ref, listed.path, folder)
        head = self._head(key)
        if head is not None and head.content_length == listed.size and \
                head.headers.get("x-oss-meta-sha256") == listed.sha256.hex():
            outcome.kept.append(listed.path)
            chunks = reuse.get(listed.sha256, (None, None))[1] or self._hash_object(key, listed, chunk_size)
            return FileEntry(listed.path, listed.size, listed.sha256, tuple(chunks))
        if listed.sha256 in reuse:
            source_key, chunks = reuse[listed.sha256]
            self._copy(source_key, key, listed)
            outcome.copied.append(listed.path)
            chunks = chunks or self._hash_object(key, listed, chunk_size)
            return FileEntry(listed.path, listed.size, listed.sha256, tuple(chunks))
        chunks = self._download_and_upload(ref, listed, key, chunk_size)
        outcome.uploaded.append(listed.path)
        outcome.uploaded_bytes += listed.size
        return FileEntry(listed.path, listed.size, listed.sha256, tuple(chunks))

    def _copy(self, source_key: str, key: str, listed) -> None:
        what = f"copying {source_key} to {key} inside OSS"
        name = self.bucket.bucket_name
        headers = {"x-oss-meta-sha256": listed.sha256.hex()}
        if listed.size <= self.copy_threshold:
            self._oss(what, self.bucket.copy_object, name, source_key, key,
                      headers={**headers, "x-oss-metadata-directive": "REPLACE"})
            return
        upload_id = self._oss(what, self.bucket.init_multipart_upload, key, headers=headers).upload_id
        parts = []
        for number, start in enumerate(range(0, listed.size, COPY_PART_SIZE), 1):
            end = min(start + COPY_PART_SIZE, listed.size) - 1
            result = self._oss(what, self.bucket.upload_part_copy, name, source_key, (start, end), key,
                               upload_id, number)
            parts.append(oss2.models.PartInfo(number, result.etag))
        self._oss(what, self.bucket.complete_multipart_upload, key, upload_id, parts)

    def _hash_object(self, key: str, listed, chunk_size: int) -> list[bytes]:
        """BLAKE3 per chunk of an object already in the mirror, proven by its SHA-256."""
        sha, chunks = hashlib.sha256(), []
        for index in range(chunk_count(listed.size, chunk_size)):
            offset, length = chunk_span(listed.size, chunk_size, index)
            data = self._oss(f"reading {key}", lambda: self.bucket.get_object(
                key, byte_range=(offset, offset + length - 1)).read())
            if len(data) != length:
                raise SourceUnavailable(f"OSS {key}: {len(data)} bytes for a {length}-byte range")
            sha.update(data)
            chunks.append(blake3_hash(data, parallel=True))
        if sha.digest() != listed.sha256:
            raise IntegrityError(f"OSS {key} does not hash like ModelScope's {listed.path}; "
                                 "delete it and run the sync again")
        return chunks

    def _download_and_upload(self, ref: ModelRef, listed, key: str, chunk_size: int) -> list[bytes]:
        """The file from ModelScope, proven by its SHA-256, then up to the mirror."""
        self.work.mkdir(parents=True, exist_ok=True)
        sha, chunks = hashlib.sha256(), []
        fd, tmp = tempfile.mkstemp(dir=self.work, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as out:
                buffer = bytearray(min(chunk_size, max(listed.size, 1)))
                for index in range(chunk_count(listed.size, chunk_size)):
                    offset, length = chunk_span(listed.size, chunk_size, index)
                    view = memoryview(buffer)[:length]
                    self._fetch_chunk(ref, ChunkRequest(listed.path, offset, length, listed.size), view)
                    sha.update(view)
                    chunks.append(blake3_hash(bytes(view), parallel=True))
                    out.write(view)
            if sha.digest() != listed.sha256:
                raise IntegrityError(f"ModelScope's {ref.model_id}/{listed.path} does not match the SHA-256 it "
                                     "lists; nothing was uploaded, run the sync again later")
            store = oss2.ResumableStore(root=str(self.work / "upload-checkpoints"))
            self._oss(f"uploading {listed.path} to {key}", oss2.resumable_upload, self.bucket, key, tmp,
                      store=store, headers={"x-oss-meta-sha256": listed.sha256.hex()},
                      multipart_threshold=64 << 20, part_size=16 << 20, num_threads=4)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return chunks

    def _fetch_chunk(self, ref: ModelRef, request: ChunkRequest, into: memoryview) -> None:
        for attempt in range(CHUNK_TRIES):
            try:
                self.origin.fetch(ref, request, into, time.monotonic() + self.settings.chunk_timeout)
                return
            except SourceUnavailable as e:
                if not e.transient or attempt == CHUNK_TRIES - 1:
                    raise
                time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def _retain(self, ref: ModelRef, current: str, outcome: SyncOutcome, snapshots: list) -> None:
        """Delete snapshots beyond the newest ``keep`` (never ``current``); tag the
        superseded ones that stay, for the lifecycle rules. ``snapshots``: as
        ``_snapshots`` listed them, newest first (listed once per sync)."""
        ordered = [current] + [f for f, _ in snapshots if f != current]
        for folder in ordered[self.keep:]:
            self._delete_folder(ref, folder)
            outcome.deleted.append(folder)
        for folder in ordered[1:self.keep]:
            self._tag_folder(ref, folder)

    def _keys(self, prefix: str) -> list[str]:
        return [obj.key for obj in oss2.ObjectIteratorV2(self.bucket, prefix=prefix, max_keys=1000)]

    def _delete_folder(self, ref: ModelRef, folder: str) -> None:
        prefix = self._folder(ref, folder)
        # The record first: a deletion cut short leaves no half snapshot that looks whole.
        self._oss(f"deleting {prefix}", self.bucket.delete_object, prefix + RECORD_NAME)
        keys = self._oss(f"listing {prefix}", self._keys, prefix)
        for start in range(0, len(keys), 1000):
            self._oss(f"deleting {prefix}", self.bucket.batch_delete_objects, keys[start:start + 1000])

    def _tag_folder(self, ref: ModelRef, folder: str) -> None:
        tagging = oss2.models.Tagging(oss2.models.TaggingRule())
        tagging.tag_set.add(*SUPERSEDED_TAG)
        for key in self._oss("listing", self._keys, self._folder(ref, folder) + "files/"):
            self._oss(f"tagging {key}", self.bucket.put_object_tagging, key, tagging)


def run_sync(plan: SyncPlan, settings: Settings, *, bucket_name: str | None = None,
             on_outcome=lambda outcome: None) -> list[SyncOutcome]:
    """Sync every model of ``plan``; one failing model does not stop the others."""
    sync = MirrorSync(settings, keep=plan.keep, bucket_name=bucket_name)
    outcomes = []
    try:
        for entry in plan.entries:
            try:
                outcome = sync.sync(entry.ref)
            except ShoalError as e:
                outcome = SyncOutcome(str(entry.ref), "failed", error=str(e))
            outcomes.append(outcome)
            on_outcome(outcome)
    finally:
        sync.close()
    return outcomes


# --------------------------------------------------------------------- policy, lifecycle

def read_only_policy(bucket: str, prefix: str, *, restore: bool = False) -> dict:
    """The RAM policy for the students' STS role: read the mirror prefix, list inside it,
    nothing else (and restore archived objects, when the lab turns ``oss.restore`` on)."""
    objects = f"acs:oss:*:*:{bucket}/{normalise_prefix(prefix)}*"
    actions = ["oss:GetObject"] + (["oss:RestoreObject"] if restore else [])
    statements = [{"Effect": "Allow", "Action": actions, "Resource": [objects]},
                  {"Effect": "Allow", "Action": ["oss:ListObjects"], "Resource": [f"acs:oss:*:*:{bucket}"],
                   "Condition": {"StringLike": {"oss:Prefix": [f"{normalise_prefix(prefix)}*"]}}}]
    return {"Version": "1", "Statement": statements}


def lifecycle_rules(prefix: str, ia_days: int, archive_days: int | None) -> list:
    """OSS lifecycle rules that move superseded snapshots' files (tagged by the sync) to IA
    after ``ia_days`` and Archive after ``archive_days``; the current snapshot is untagged."""
    from oss2.models import LifecycleRule, StorageTransition, Tagging, TaggingRule
    if ia_days < 1 or (archive_days is not None and archive_days <= ia_days):
        raise UsageError("lifecycle: --ia-after must be at least 1 day and --archive-after later than it")
    transitions = [StorageTransition(days=ia_days, storage_class=oss2.BUCKET_STORAGE_CLASS_IA)]
    if archive_days is not None:
        transitions.append(StorageTransition(days=archive_days, storage_class=oss2.BUCKET_STORAGE_CLASS_ARCHIVE))
    tagging = Tagging(TaggingRule())
    tagging.tag_set.add(*SUPERSEDED_TAG)
    return [LifecycleRule("shoal-superseded-snapshots", normalise_prefix(prefix), status=LifecycleRule.ENABLED,
                          storage_transitions=transitions, tagging=tagging)]
