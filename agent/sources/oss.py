"""The lab's OSS mirror, read with Alibaba's oss2 client, and the mirror's object layout.

Layout under the configured prefix (``SHOAL_OSS_PREFIX``), one folder per model revision::

    {prefix}{owner}/{name}/{revision}/manifest.shoal      canonical msgpack manifest
    {prefix}{owner}/{name}/{revision}/files/{path}        each file, byte for byte

The manifest object is written last by ``shoal mirror push``, so its presence means the
revision is complete; it is what makes a pull from the mirror verifiable chunk by chunk.
"""

from __future__ import annotations

import logging

import oss2
import requests
import urllib3

from agent.config import Settings
from agent.errors import ConfigError, CredentialsRejected, NotFound, SourceUnavailable
from agent.manifest import MAX_MANIFEST_BYTES, ModelRef
from agent.sources import ChunkRequest, Origin, expect_span, read_exact

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.shoal"
# Errors OSS returns for credentials it does not accept.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "SecurityTokenExpired",
                     "InvalidSecurityToken", "AccessDenied", "InvalidObjectState"}
_NETWORK_ERRORS = (OSError, requests.RequestException, urllib3.exceptions.HTTPError)


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def revision_prefix(prefix: str, ref: ModelRef) -> str:
    return f"{normalise_prefix(prefix)}{ref.model_id}/{ref.revision}/"


def manifest_key(prefix: str, ref: ModelRef) -> str:
    return revision_prefix(prefix, ref) + MANIFEST_NAME


def file_key(prefix: str, ref: ModelRef, path: str) -> str:
    return revision_prefix(prefix, ref) + "files/" + path


def make_bucket(settings: Settings, bucket_name: str | None = None, *, pool_size: int | None = None) -> oss2.Bucket:
    """An ``oss2.Bucket`` from settings: V4 signing when a region is set, STS when a token is."""
    name = bucket_name or settings.oss_bucket
    if not name or not settings.oss_endpoint:
        raise ConfigError("no OSS mirror configured: set SHOAL_OSS_BUCKET and OSS_ENDPOINT")
    key_id, secret, token = (settings.oss_access_key_id, settings.oss_access_key_secret,
                             settings.oss_session_token)
    version = oss2.AUTH_VERSION_4 if settings.oss_region else oss2.AUTH_VERSION_1
    if token:
        auth = oss2.StsAuth(key_id, secret, token, auth_version=version)
    elif key_id:
        auth = oss2.make_auth(key_id, secret, version)
    else:
        auth = oss2.AnonymousAuth()
    kwargs = {"region": settings.oss_region} if settings.oss_region else {}
    return oss2.Bucket(auth, settings.oss_endpoint, name,
                       connect_timeout=min(settings.connect_timeout, settings.chunk_timeout),
                       session=oss2.Session(pool_size=pool_size or settings.concurrency + 4),
                       app_name="shoal", **kwargs)


def translate_oss_error(e: Exception, what: str, *, anonymous: bool) -> Exception:
    """Map an oss2 or network exception onto shoal's error tree."""
    if isinstance(e, oss2.exceptions.NoSuchKey):
        return NotFound(f"{what}: not in the OSS mirror")
    if isinstance(e, oss2.exceptions.NoSuchBucket):
        return NotFound(f"{what}: the OSS bucket does not exist; check SHOAL_OSS_BUCKET and OSS_ENDPOINT")
    if isinstance(e, oss2.exceptions.OssError):
        status, code = e.status, getattr(e, "code", "") or ""
        if status in (401, 403) or code in _CREDENTIAL_CODES:
            hint = ("the bucket refuses anonymous reads: set OSS_ACCESS_KEY_ID and "
                    "OSS_ACCESS_KEY_SECRET (and OSS_SESSION_TOKEN for STS)") if anonymous else (
                    "check OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET, renew an expired "
                    "OSS_SESSION_TOKEN, and that the key may read this bucket")
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
        self.bucket = make_bucket(settings)
        self._anonymous = not settings.oss_access_key_id

    def _error(self, e: Exception, what: str) -> Exception:
        return translate_oss_error(e, what, anonymous=self._anonymous)

    def get_manifest(self, ref: ModelRef) -> bytes | None:
        """The encoded manifest object of ``ref``, or None if the mirror lacks it."""
        key = manifest_key(self.prefix, ref)
        try:
            result = self.bucket.get_object(key)
            try:
                if result.content_length is not None and result.content_length > MAX_MANIFEST_BYTES:
                    raise SourceUnavailable(f"OSS manifest {key} is {result.content_length} bytes, "
                                            f"more than {MAX_MANIFEST_BYTES}", transient=False)
                return result.read()
            finally:
                result.close()
        except oss2.exceptions.NoSuchKey:
            return None
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, f"reading manifest of {ref} from OSS") from e

    def list_models(self, limit: int = 50_000) -> list[tuple[str, str]]:
        """(model id, revision) of every complete revision in the mirror (a manifest object)."""
        found, seen = [], 0
        base = normalise_prefix(self.prefix)
        try:
            for obj in oss2.ObjectIteratorV2(self.bucket, prefix=base, max_keys=1000):
                seen += 1
                if seen > limit:
                    break
                if obj.key.endswith("/" + MANIFEST_NAME):
                    parts = obj.key[len(base):].split("/")
                    if len(parts) >= 4:
                        found.append(("/".join(parts[:-2]), parts[-2]))
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "listing the OSS mirror") from e
        return found

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        key = file_key(self.prefix, ref, request.path)
        what = f"OSS {key} [{request.offset}+{request.length}]"
        try:
            result = self.bucket.get_object(
                key, byte_range=(request.offset, request.offset + request.length - 1))
        except (oss2.exceptions.OssError, *_NETWORK_ERRORS) as e:
            raise self._error(e, what) from e
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
