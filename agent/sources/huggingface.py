"""A Hugging Face–compatible hub (the Hub, or a lab's hf-mirror), the origin after ModelScope.

Off unless ``HF_ENDPOINT`` is set (``huggingface.endpoint``); ``HF_TOKEN`` is sent when
set. The listing comes from the hub's API through ``huggingface_hub``
(``HfApi.model_info(files_metadata=True)``): paths, sizes, and for LFS files (the weights)
the SHA-256. A small file kept in git rather than LFS is listed with its git blob id only;
shoal fetches it once at listing time (such files are under the hub's LFS threshold, a few
MB at most; ``MAX_SMALL_FILE`` bounds it), checks it against that id and lists its SHA-256,
so every file of the plan is verified as ModelScope's are. Bytes come by ranged GET on
``{endpoint}/{repo}/resolve/{revision}/{path}``, following the hub's redirect to its CDN.

shoal's default revision ``master`` means the hub's default branch, ``main``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote

from agent.config import Settings
from agent.errors import ConfigError, CredentialsRejected, ManifestError, NotFound, SourceUnavailable
from agent.manifest import Listing, ModelRef, make_listing
from agent.sources import ChunkRequest, Origin
from agent.sources.http import hub_session, ranged_get
MAX_SMALL_FILE = 64 * 1024 * 1024  # a non-LFS file read whole at listing time, at most
MAX_REDIRECTS = 3


def hub_revision(revision: str) -> str:
    """The hub's name for a revision: shoal's default ``master`` is the hub's ``main``."""
    return "main" if revision == "master" else revision


class HuggingFaceSource(Origin):
    """See module docstring."""

    name = "huggingface"
    lists_files = True

    def __init__(self, settings: Settings):
        self.endpoint = settings.hf_endpoint.rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"HF_ENDPOINT {settings.hf_endpoint!r} is not an http(s) URL; "
                              "set it to the hub's address, e.g. https://hf-mirror.com")
        self._token = settings.hf_token
        self._timeout = (settings.connect_timeout, min(settings.chunk_timeout, 60.0))
        self._session = hub_session(settings.concurrency, self._token, max_redirects=MAX_REDIRECTS)

    def file_url(self, ref: ModelRef, path: str) -> str:
        return (f"{self.endpoint}/{ref.model_id}/resolve/{quote(hub_revision(ref.revision), safe='')}/"
                f"{quote(path)}")

    # ------------------------------------------------------------------ listing

    def list_files(self, ref: ModelRef) -> Listing:
        """The validated listing of ``ref`` (paths, sizes, SHA-256)."""
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                                RevisionNotFoundError)
        except ImportError:
            raise ConfigError("HF_ENDPOINT is set but the Hugging Face client is not installed: "
                              "pip install 'shoal[hf]' (or unset HF_ENDPOINT)") from None
        if ref.is_dataset:  # the next source (ModelScope, the mirror, peers) may have it
            raise NotFound(f"shoal takes datasets from the mirror, the room and ModelScope, not yet from "
                           f"the Hugging Face hub: {ref} is not fetched from {self.endpoint}")
        revision = hub_revision(ref.revision)
        what = f"listing {ref} on the Hugging Face hub ({self.endpoint})"
        try:
            info = HfApi(endpoint=self.endpoint, token=self._token or False, library_name="shoal-agent",
                         library_version="0.1").model_info(
                ref.model_id, revision=revision, files_metadata=True, timeout=self._timeout[1])
        except GatedRepoError as e:
            raise CredentialsRejected(f"{what}: the hub refused the request (gated model); set HF_TOKEN "
                                      "to a token that was granted access") from e
        except RevisionNotFoundError as e:
            raise NotFound(f"the Hugging Face hub has {ref.model_id} but no revision {revision}") from e
        except RepositoryNotFoundError as e:
            # Without a token the Hub answers a private repo as it answers a missing one.
            hint = "" if self._token else " (or it is private: set HF_TOKEN)"
            raise NotFound(f"the Hugging Face hub has no model {ref.model_id}{hint}") from e
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise CredentialsRejected(f"{what}: the hub refused the request ({status}); check HF_TOKEN") from e
            said = f" ({e.server_message.strip()[:300]})" if getattr(e, "server_message", None) else ""
            raise SourceUnavailable(f"{what} failed: {str(e).splitlines()[0]}{said}") from e
        except Exception as e:  # httpx's network errors, which huggingface_hub lets through
            if type(e).__module__.startswith(("httpx", "httpcore")) or isinstance(e, OSError):
                raise SourceUnavailable(f"{what} failed: cannot reach the hub ({type(e).__name__}); "
                                        "check HF_ENDPOINT and the network") from e
            raise
        entries = []
        for sibling in info.siblings or []:
            if sibling.lfs is not None:
                entries.append((sibling.rfilename, sibling.lfs.size, sibling.lfs.sha256))
            else:
                entries.append((sibling.rfilename, sibling.size, self._small_file_sha256(ref, sibling)))
        return make_listing(ref.model_id, ref.revision, entries)

    def _small_file_sha256(self, ref: ModelRef, sibling) -> str:
        """A non-LFS file's SHA-256, from its bytes proven against the git blob id the hub listed."""
        path, size, blob_id = sibling.rfilename, sibling.size, sibling.blob_id
        if not isinstance(size, int) or not isinstance(blob_id, str) or len(blob_id) != 40:
            raise ManifestError(f"the hub lists {path!r} without a size and git blob id; shoal cannot verify it")
        if size > MAX_SMALL_FILE:
            raise ManifestError(f"the hub lists {path!r} ({size} bytes) outside LFS, with no SHA-256; "
                                f"shoal reads such files whole only up to {MAX_SMALL_FILE} bytes")
        data = bytearray(size)
        if size:
            self.fetch(ref, ChunkRequest(path, 0, size, size), memoryview(data), time.monotonic() + self._timeout[1])
        blob = hashlib.sha1(b"blob %d\0" % size + data).hexdigest()
        if not hmac.compare_digest(blob, blob_id):
            raise ManifestError(f"{path!r} from the hub does not match the git blob id it lists "
                                f"({blob} != {blob_id}): a corrupt file or a lying hub")
        return hashlib.sha256(data).hexdigest()

    # ------------------------------------------------------------------- bytes

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        ranged_get(self._session, self.file_url(ref, request.path), request, into, deadline, self._timeout,
                   what=f"Hugging Face {ref.model_id}/{request.path} [{request.offset}+{request.length}]",
                   hub="the hub", token_hint="set HF_TOKEN to a token that may read this model")

    def close(self) -> None:
        self._session.close()
