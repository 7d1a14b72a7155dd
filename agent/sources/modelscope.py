"""ModelScope, the origin: file listings through the modelscope SDK, bytes by ranged GET.

The listing comes from ``HubApi.list_repo_files`` (it carries each file's SHA-256); the
bytes come from the same endpoint's ``/api/v1/models/{id}/repo?Revision=&FilePath=``
URL (built by the SDK's ``get_file_download_url``), read with a pooled ``requests``
session so many ranges are in flight at once. A dataset (``datasets/OWNER/NAME``) is
listed the same way with ``repo_type="dataset"`` (the SDK pages
``/api/v1/datasets/{id}/repo/tree``) and read from ``/api/v1/datasets/{id}/repo?...``
(``modelscope_hub/_legacy_api.py: get_download_url``). ``MODELSCOPE_ENDPOINT`` and
``MODELSCOPE_API_TOKEN`` are honoured as the SDK honours them.
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
from agent.sources.http import hub_session, ranged_get


_SDK_IMPORT = threading.Lock()


def _sdk():
    """The SDK's parts this source uses, imported once under a lock: the SDK is slow to
    import (only when needed), and two threads importing its modules at once (a listing
    and a chunk's URL, say) can deadlock on its circular imports (``_DeadlockError``)."""
    with _SDK_IMPORT:
        from modelscope.hub.api import HubApi
        from modelscope.hub.file_download import get_file_download_url
        from modelscope_hub.errors import HubError, NotExistError
        if not os.environ.get("MODELSCOPE_LOG_LEVEL"):  # its INFO lines ("Listing ...") would cut
            logging.getLogger("modelscope_hub").setLevel(logging.WARNING)  # through the progress line
    return HubApi, get_file_download_url, HubError, NotExistError


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
        HubApi, _, HubError, NotExistError = _sdk()

        kind, repo = hub_repo(ref.model_id)
        what = f"listing {ref} on ModelScope ({self.endpoint})"
        try:
            api = HubApi(endpoint=self.endpoint, token=self._token,
                         timeout=int(self._timeout[1]), max_retries=1)
            files = api.list_repo_files(repo, kind, revision=ref.revision)
        except NotExistError as e:
            raise NotFound(f"ModelScope has no {kind} {repo} at revision {ref.revision}: "
                           "check the spelling (OWNER/NAME, case matters) and the revision") from e
        except HubError as e:
            status = getattr(e, "status_code", None) or getattr(e, "status", None)
            if status in (401, 403):
                raise CredentialsRejected(
                    f"{what}: ModelScope refused the request ({status}); set MODELSCOPE_API_TOKEN "
                    f"to a token that may read this {kind}") from e
            raise SourceUnavailable(f"{what} failed: {str(e).splitlines()[0]}") from e
        except _NETWORK_ERRORS as e:
            raise SourceUnavailable(f"{what} failed: cannot reach the hub ({type(e).__name__}); "
                                    "check MODELSCOPE_ENDPOINT and the network") from e
        entries = [(f.path, f.size, f.sha256) for f in files
                   if (getattr(f, "type", "blob") or "blob") == "blob"]
        return make_listing(ref.model_id, ref.revision, entries)

    def file_url(self, ref: ModelRef, path: str) -> str:
        kind, repo = hub_repo(ref.model_id)
        if kind == "dataset":  # the URL the SDK's own dataset download builds
            return (f"{self.endpoint}/api/v1/datasets/{repo}/repo?Revision={quote_plus(ref.revision)}"
                    f"&FilePath={quote_plus(path)}")
        get_file_download_url = _sdk()[1]
        return get_file_download_url(repo, path, ref.revision, endpoint=self.endpoint)

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        ranged_get(self._session, self.file_url(ref, request.path), request, into, deadline, self._timeout,
                   what=f"ModelScope {ref.model_id}/{request.path} [{request.offset}+{request.length}]",
                   hub="ModelScope", token_hint="set MODELSCOPE_API_TOKEN to a token that may read this model")

    def close(self) -> None:
        self._session.close()
