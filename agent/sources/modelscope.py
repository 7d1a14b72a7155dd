"""ModelScope, the origin: file listings through the modelscope SDK's hub client, bytes by
ranged GET.

The listing comes from ``modelscope_hub``'s ``LegacyClient.list_repo_files`` (it carries
each file's SHA-256), the client that ``modelscope.hub.api.HubApi`` itself wraps; the bytes
come from ``/api/v1/models/{id}/repo?Revision=&FilePath=`` (the URL the SDK's
``get_file_download_url`` builds), read with a pooled ``requests`` session so many ranges
are in flight at once. A dataset (``datasets/OWNER/NAME``) is listed the same way with
``repo_type="dataset"`` (the SDK pages ``/api/v1/datasets/{id}/repo/tree``) and read from
``/api/v1/datasets/{id}/repo?...`` (``modelscope_hub/_legacy_api.py: get_download_url``).
``MODELSCOPE_ENDPOINT`` and ``MODELSCOPE_API_TOKEN`` are honoured as the SDK honours them.

Why not ``modelscope.hub.api``: importing the ``modelscope`` package imports torch, ~200 MB
of resident memory in a long-running agent for nothing (measured: 40 MB with
``modelscope_hub`` alone, 237 MB through ``modelscope.hub.api``).
"""

from __future__ import annotations

import logging
import os
import threading
from urllib.parse import quote_plus

from agent.config import Settings
from agent.errors import CredentialsRejected, NotFound, SourceUnavailable
from agent.manifest import Listing, ModelRef, hub_repo, make_listing
from agent.sources import ChunkRequest, Origin
from agent.sources.http import NETWORK_ERRORS as _NETWORK_ERRORS
from agent.sources.http import USER_AGENT, hub_session, ranged_get


_SDK_IMPORT = threading.Lock()


def _sdk():
    """The hub client's parts this source uses, imported once under a lock: only when needed,
    and two threads importing its modules at once (a pull's listing and the upstream check's,
    say) could deadlock on circular imports (``_DeadlockError``; seen with the full SDK)."""
    with _SDK_IMPORT:
        from modelscope_hub._legacy_api import LegacyClient
        from modelscope_hub.errors import HubError, NotExistError
        if not os.environ.get("MODELSCOPE_LOG_LEVEL"):  # its INFO lines ("Listing ...") would cut
            logging.getLogger("modelscope_hub").setLevel(logging.WARNING)  # through the progress line
    return LegacyClient, HubError, NotExistError


class ModelScopeSource(Origin):
    """The origin: listings with SHA-256 through the SDK, bytes by ranged GET."""

    name = "modelscope"
    lists_files = True

    def __init__(self, settings: Settings):
        self.endpoint = settings.modelscope_endpoint.rstrip("/")
        self._token = settings.modelscope_token
        self._timeout = (settings.connect_timeout, min(settings.chunk_timeout, 60.0))
        self._session = hub_session(settings.concurrency, self._token)

    def list_files(self, ref: ModelRef) -> Listing:
        """The validated listing of ``ref`` (paths, sizes, SHA-256)."""
        LegacyClient, HubError, NotExistError = _sdk()

        kind, repo = hub_repo(ref.model_id)
        what = f"listing {ref} on ModelScope ({self.endpoint})"
        try:
            client = LegacyClient(token=self._token, endpoint=self.endpoint, timeout=int(self._timeout[1]),
                                  max_retries=1, user_agent=USER_AGENT)
            files = client.list_repo_files(repo_id=repo, repo_type=kind, revision=ref.revision, recursive=True)
        except NotExistError as e:
            raise NotFound(f"ModelScope has no {kind} {repo} at revision {ref.revision}: "
                           "check the spelling (OWNER/NAME, case matters) and the revision") from e
        except _NETWORK_ERRORS as e:  # the client's NetworkError ("Connection failed") is an OSError too
            raise SourceUnavailable(f"{what} failed: cannot reach the hub ({type(e).__name__}); "
                                    "check MODELSCOPE_ENDPOINT and the network") from e
        except HubError as e:
            status = getattr(e, "status_code", None) or getattr(e, "status", None)
            if status in (401, 403):
                raise CredentialsRejected(
                    f"{what}: ModelScope refused the request ({status}); set MODELSCOPE_API_TOKEN "
                    f"to a token that may read this {kind}") from e
            raise SourceUnavailable(f"{what} failed: {str(e).splitlines()[0]}") from e
        if not isinstance(files, list):
            raise SourceUnavailable(f"{what}: the hub answered something that is no file listing")
        entries = [(f.get("Path") or f.get("path") or f.get("Name"), f.get("Size", f.get("size")),
                    f.get("Sha256") or f.get("sha256")) for f in files
                   if isinstance(f, dict) and (f.get("Type") or f.get("type") or "blob") == "blob"]
        return make_listing(ref.model_id, ref.revision, entries)

    def file_url(self, ref: ModelRef, path: str) -> str:
        """The URL the SDK's own downloads build (``get_file_download_url``, ``get_download_url``).

        A ``/`` in the file path stays as it is (a query may hold one; the hub decodes both
        spellings alike): a URL with no ``%`` in it takes urllib3's fast path, where one
        with ``%2F`` was normalised byte by byte, twice per request (yappi: the largest
        single cost of urllib3 in a pull of many small files)."""
        kind, repo = hub_repo(ref.model_id)
        return (f"{self.endpoint}/api/v1/{kind}s/{repo}/repo?Revision={quote_plus(ref.revision)}"
                f"&FilePath={quote_plus(path, safe='/')}")

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        ranged_get(self._session, self.file_url(ref, request.path), request, into, deadline, self._timeout,
                   what=f"ModelScope {ref.model_id}/{request.path} [{request.offset}+{request.length}]",
                   hub="ModelScope", token_hint="set MODELSCOPE_API_TOKEN to a token that may read this model")

    def close(self) -> None:
        self._session.close()
