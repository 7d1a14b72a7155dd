"""The lab's OSS mirror, read with Alibaba's oss2 client, and the mirror's object layout.

Layout under the configured prefix (``SHOAL_OSS_PREFIX``), one folder per model revision::

    {prefix}{owner}/{name}/{revision}/manifest.shoal      canonical msgpack manifest
    {prefix}{owner}/{name}/{revision}/files/{path}        each file, byte for byte

The manifest object is written last by ``shoal mirror push``, so its presence means the
revision is complete; it is what makes a pull from the mirror verifiable chunk by chunk.
``shoal mirror sync`` (``agent.mirrorsync``) keeps several synced copies of a revision in
snapshot folders ``{revision}~{16 hex}`` laid out the same way, and a pointer
``{revision}/current.json`` naming the current one, written last; a pull follows the
pointer when there is one, else reads the folder itself.

Credentials come from ``agent.sources.osscreds`` (static keys, or the Alibaba Cloud chain
with STS tokens that refresh); a request refused for an expired token is retried once with
fresh credentials. An object in Archive / Cold Archive storage answers GET with 403
``InvalidObjectState`` until restored: the pull takes that file from the next source at
once (``ObjectArchived``), and with ``oss.restore`` asks OSS to restore it for next time.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import oss2
import requests
import urllib3

from agent.config import Settings
from agent.errors import ConfigError, CredentialsRejected, NotFound, ObjectArchived, SourceUnavailable
from agent.manifest import MAX_MANIFEST_BYTES, ModelRef
from agent.sources import ChunkRequest, Origin, expect_span, read_exact
from agent.sources.osscreds import RefreshingCredentials, make_auth

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.shoal"
# Errors OSS returns for credentials it does not accept.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "SecurityTokenExpired",
                     "InvalidSecurityToken", "AccessDenied"}
# Errors after which fresh credentials from a refreshing provider may succeed (once).
_EXPIRED_CODES = {"SecurityTokenExpired", "InvalidSecurityToken"}
ARCHIVE_CLASSES = {"Archive", "ColdArchive", "DeepColdArchive"}
ARCHIVED_RECHECK = 600.0  # seconds an object found archived is taken from the next source without asking
_NETWORK_ERRORS = (OSError, requests.RequestException, urllib3.exceptions.HTTPError)


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def revision_prefix(prefix: str, ref: ModelRef, folder: str | None = None) -> str:
    """The revision's own folder, or ``folder`` (a synced snapshot ``{rev}~{hex}``) of ``ref``."""
    return f"{normalise_prefix(prefix)}{ref.model_id}/{folder or ref.revision}/"


def manifest_key(prefix: str, ref: ModelRef, folder: str | None = None) -> str:
    return revision_prefix(prefix, ref, folder) + MANIFEST_NAME


def file_key(prefix: str, ref: ModelRef, path: str, folder: str | None = None) -> str:
    """The object of ``path``; ``folder`` (a snapshot) instead of the revision's own."""
    return revision_prefix(prefix, ref, folder) + "files/" + path


POINTER_NAME = "current.json"
MAX_POINTER_BYTES = 64 * 1024


def pointer_key(prefix: str, ref: ModelRef) -> str:
    return revision_prefix(prefix, ref) + POINTER_NAME


def is_snapshot_of(folder: str, revision: str) -> bool:
    """Whether ``folder`` names a snapshot of ``revision`` (never a path elsewhere)."""
    head, sep, tail = folder.rpartition("~")
    return bool(sep) and head == revision and len(tail) == 16 and all(c in "0123456789abcdef" for c in tail)


def make_bucket(settings: Settings, bucket_name: str | None = None, *, pool_size: int | None = None,
                crc: bool = True) -> oss2.Bucket:
    """An ``oss2.Bucket`` from settings: V4 signing when a region is set, STS when a token is.
    ``crc``: oss2's CRC-64 check of uploads and whole-object reads (see ``OssSource``)."""
    name = bucket_name or settings.oss_bucket
    if not name or not settings.oss_endpoint:
        raise ConfigError("no OSS mirror configured: set SHOAL_OSS_BUCKET and OSS_ENDPOINT")
    auth, _ = make_auth(settings)
    kwargs = {"region": settings.oss_region} if settings.oss_region else {}
    return oss2.Bucket(auth, settings.oss_endpoint, name,
                       connect_timeout=min(settings.connect_timeout, settings.chunk_timeout),
                       session=oss2.Session(pool_size=pool_size or settings.concurrency + 4),
                       app_name="shoal", enable_crc=crc, **kwargs)


def translate_oss_error(e: Exception, what: str, *, anonymous: bool, refreshing: bool = False) -> Exception:
    """Map an oss2 or network exception onto shoal's error tree."""
    if isinstance(e, oss2.exceptions.ServerError) and getattr(e, "code", "") == "InvalidObjectState":
        return ObjectArchived(f"{what}: the object is in archive storage and not restored; "
                              "`shoal mirror status` shows its state, oss.restore = true restores what a pull meets")
    if isinstance(e, oss2.exceptions.NoSuchKey):
        return NotFound(f"{what}: not in the OSS mirror")
    if isinstance(e, oss2.exceptions.NoSuchBucket):
        return NotFound(f"{what}: the OSS bucket does not exist; check SHOAL_OSS_BUCKET and OSS_ENDPOINT")
    if isinstance(e, oss2.exceptions.OssError):
        status, code = e.status, getattr(e, "code", "") or ""
        if status in (401, 403) or code in _CREDENTIAL_CODES:
            if refreshing:
                hint = ("even fresh credentials from the Alibaba Cloud chain were refused: check that its "
                        "RAM policy may read this bucket and prefix (`shoal doctor` shows the source)")
            elif anonymous:
                hint = ("the bucket refuses anonymous reads: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, "
                        "or oss.credentials = \"chain\" for the Alibaba Cloud credentials chain")
            else:
                hint = ("check OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET and that the key may read this bucket; "
                        "an OSS_SESSION_TOKEN is never refreshed: oss.credentials = \"chain\" refreshes STS tokens")
            return CredentialsRejected(f"{what}: OSS refused the request ({status} {code or 'Forbidden'}); {hint}")
        if status == -2 or status >= 500 or status in (408, 429):
            detail = code or (str(getattr(e, "body", "") or "")[:120]) or "network error"
            return SourceUnavailable(f"{what}: OSS answered {status if status > 0 else 'nothing'} ({detail})")
        return SourceUnavailable(f"{what}: OSS answered {status} {code}", transient=False)
    if isinstance(e, _NETWORK_ERRORS):
        return SourceUnavailable(f"{what}: connection to OSS failed ({type(e).__name__})")
    return e


class OssSource(Origin):
    """Ranged GETs of mirrored files from the lab's OSS bucket; the mirror's manifests."""

    name = "oss"
    keeps_manifests = True

    def __init__(self, settings: Settings):
        self.prefix = settings.oss_prefix
        # No CRC-64: chunks are read off the raw response (never through oss2's CRC adapter)
        # and proven by BLAKE3; a manifest damaged on the way fails to decode, or its chunks
        # fail their hashes. With it on, oss2 built two CRC tables in pure Python for every
        # GET (py-spy showed them per chunk; 0.6 ms each on an idle core, issue 28).
        self.bucket = make_bucket(settings, crc=False)
        provider = getattr(self.bucket.auth, "credentials_provider", None)
        self.credentials = provider if isinstance(provider, RefreshingCredentials) else None
        self._anonymous = not settings.oss_access_key_id and self.credentials is None
        self._restore = (settings.oss_restore, settings.oss_restore_tier, settings.oss_restore_days)
        self._archived_lock = threading.Lock()
        # Keys found archived -> when: not asked again for a while (a restore takes minutes
        # to hours; an agent runs for days, so it asks again after ARCHIVED_RECHECK).
        self._archived: dict[str, float] = {}
        self.restores_requested: list[str] = []
        self._folders: dict[str, str] = {}  # str(ref) -> the snapshot folder its manifest came from

    def _error(self, e: Exception, what: str) -> Exception:
        return translate_oss_error(e, what, anonymous=self._anonymous, refreshing=self.credentials is not None)

    def _call(self, fn, *args, **kwargs):
        """``fn(...)``; when OSS says the STS token expired and the credentials can refresh,
        once more with fresh ones (the failed request sent no data)."""
        generation = self.credentials.generation if self.credentials is not None else 0
        try:
            return fn(*args, **kwargs)
        except oss2.exceptions.OssError as e:
            if self.credentials is None or getattr(e, "code", "") not in _EXPIRED_CODES:
                raise
            log.info("OSS refused the STS token (%s): refreshing the credentials and asking again", e.code)
            self.credentials.refresh(generation)
        return fn(*args, **kwargs)

    def _known_archived(self, key: str) -> bool:
        """Whether ``key`` was found archived less than ``ARCHIVED_RECHECK`` ago (call with
        ``_archived_lock`` held)."""
        seen = self._archived.get(key)
        return seen is not None and time.monotonic() - seen < ARCHIVED_RECHECK

    def _archived_object(self, key: str) -> None:
        """First meeting with an archived ``key``: ask OSS to restore it when the lab wants."""
        with self._archived_lock:
            if self._known_archived(key):
                return
            self._archived[key] = time.monotonic()
        restore, tier, days = self._restore
        if not restore:
            log.info("OSS %s is archived; taking it from the next source (oss.restore is off)", key)
            return
        try:
            head = self._call(self.bucket.head_object, key)
            storage = head.headers.get("x-oss-storage-class", "")
            job = oss2.models.RestoreJobParameters(tier) if storage in ("ColdArchive", "DeepColdArchive") else None
            self._call(self.bucket.restore_object, key,
                       input=oss2.models.RestoreConfiguration(days=days, job_parameters=job))
            self.restores_requested.append(key)
            log.info("OSS %s is %s: restore requested (tier %s, %d days); this pull takes it from the next source",
                     key, storage or "archived", tier if job else "-", days)
        except oss2.exceptions.OssError as e:
            if getattr(e, "code", "") == "RestoreAlreadyInProgress":
                log.info("OSS %s: a restore is already in progress", key)
            else:
                log.warning("OSS %s: restore request refused (%s %s)", key, e.status, getattr(e, "code", ""))
        except _NETWORK_ERRORS as e:
            log.warning("OSS %s: restore request failed (%s)", key, type(e).__name__)

    def _read_small(self, key: str, limit: int, what: str) -> bytes | None:
        """A whole small object (at most ``limit`` bytes), or None when there is none."""
        try:
            result = self._call(self.bucket.get_object, key)
            try:
                if result.content_length is not None and result.content_length > limit:
                    raise SourceUnavailable(f"OSS {what} {key} is {result.content_length} bytes, "
                                            f"more than {limit}", transient=False)
                return result.read(limit + 1)[:limit]
            finally:
                result.close()
        except oss2.exceptions.NoSuchKey:
            return None
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, f"reading {what} {key} from OSS") from e

    def current_snapshot(self, ref: ModelRef) -> dict | None:
        """The sync pointer of ``ref`` (``agent.mirrorsync``), checked, or None."""
        data = self._read_small(pointer_key(self.prefix, ref), MAX_POINTER_BYTES, "sync pointer")
        if data is None:
            return None
        try:
            pointer = json.loads(data)
        except ValueError:
            pointer = None
        if not isinstance(pointer, dict) or not is_snapshot_of(str(pointer.get("snapshot", "")), ref.revision):
            raise SourceUnavailable(f"the mirror's sync pointer {pointer_key(self.prefix, ref)} is malformed; "
                                    "run `shoal mirror sync` again", transient=False)
        return pointer

    def made_at(self, ref: ModelRef) -> str | None:
        """When the mirror's copy of ``ref`` was made: its sync time, or its manifest's
        upload time for a revision `mirror push` wrote (UTC, ISO 8601)."""
        pointer = self.current_snapshot(ref)
        if pointer is not None:
            return str(pointer.get("synced_at") or "") or None
        try:
            head = self._call(self.bucket.head_object, manifest_key(self.prefix, ref))
        except oss2.exceptions.NotFound:
            return None
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, f"reading the manifest of {ref}") from e
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(head.last_modified)) if head.last_modified else None

    def get_manifest(self, ref: ModelRef) -> bytes | None:
        """The encoded manifest object of ``ref`` (through its sync pointer if it has one),
        or None if the mirror lacks it."""
        # The folder's own manifest first (what `mirror push` writes: one request for the
        # common case); a synced revision has none there (the sync removes it), only a pointer.
        folder = None
        data = self._read_small(manifest_key(self.prefix, ref), MAX_MANIFEST_BYTES, "manifest")
        if data is None:
            pointer = self.current_snapshot(ref)
            if pointer is None:
                return None
            folder = pointer["snapshot"]
            data = self._read_small(manifest_key(self.prefix, ref, folder), MAX_MANIFEST_BYTES, "manifest")
        if data is not None:
            # The files of this manifest are in its folder: a pull keeps reading there even
            # when a sync moves the pointer meanwhile (old snapshots are kept).
            with self._archived_lock:
                if folder is None:
                    self._folders.pop(str(ref), None)
                else:
                    self._folders[str(ref)] = folder
        return data

    def head_file(self, ref: ModelRef, path: str):
        """The HEAD of ``path`` of ``ref`` where its last manifest read (``get_manifest``)
        says its files are, or None when there is no such object."""
        with self._archived_lock:
            folder = self._folders.get(str(ref))
        key = file_key(self.prefix, ref, path, folder)
        try:
            return self._call(self.bucket.head_object, key)
        except oss2.exceptions.NotFound:
            return None
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, f"HEAD {key}") from e

    def list_models(self, limit: int = 50_000) -> list[tuple[str, str]]:
        """(model id, revision) of every complete revision in the mirror (a manifest object)."""
        base = normalise_prefix(self.prefix)

        def listing() -> list[tuple[str, str]]:
            found = []
            for seen, obj in enumerate(oss2.ObjectIteratorV2(self.bucket, prefix=base, max_keys=1000)):
                if seen >= limit:
                    break
                if obj.key.endswith(("/" + MANIFEST_NAME, "/" + POINTER_NAME)):
                    parts = obj.key[len(base):].split("/")
                    if len(parts) >= 4 and "~" not in parts[-2]:  # snapshots are reached by pointers
                        found.append(("/".join(parts[:-2]), parts[-2]))
            return list(dict.fromkeys(found))
        try:
            return self._call(listing)
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "listing the OSS mirror") from e

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        with self._archived_lock:
            folder = self._folders.get(str(ref))
        key = file_key(self.prefix, ref, request.path, folder)
        what = f"OSS {key} [{request.offset}+{request.length}]"
        with self._archived_lock:
            archived = self._known_archived(key)
        if archived:  # known archived: no request per chunk
            raise ObjectArchived(f"{what}: the object is in archive storage and not restored")
        try:
            result = self._call(self.bucket.get_object, key,
                                byte_range=(request.offset, request.offset + request.length - 1))
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            error = self._error(e, what)
            if isinstance(error, ObjectArchived):
                self._archived_object(key)
            raise error from e
        try:
            expect_span(result.status, result.content_length, request, what)
            raw = result.resp.response.raw  # urllib3 response: readinto avoids a copy
            read_exact(raw.readinto, into, request.length, deadline, what)
        except _NETWORK_ERRORS as e:
            raise self._error(e, what) from e
        finally:
            # Closing an unfinished body drops the connection instead of draining it.
            result.resp.response.close()

    def close(self) -> None:
        self.bucket.session.session.close()
