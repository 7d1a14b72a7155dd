"""A ModelScope-compatible hub on loopback, serving the endpoints the modelscope SDK calls.

Endpoints (as modelscope 1.40 / modelscope_hub 0.5 calls them; ``{kind}`` is ``models`` or
``datasets``):
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=..&Recursive=True`` listing with SHA-256
- ``GET /api/v1/datasets/{owner}/{name}/repo/tree?Revision=..&Recursive=True&PageNumber=..&PageSize=..``
  the dataset listing, paged (``modelscope_hub/_legacy_api.py: list_dataset_files_paginated``)
- ``GET /api/v1/{kind}/{owner}/{name}/revisions``                               branches and tags
- ``GET /api/v1/{kind}/{owner}/{name}/repo?Revision=..&FilePath=..``          bytes, honouring Range
- ``GET /api/v1/{kind}/{owner}/{name}`` and ``/openapi/v1/{kind}/{owner}/{name}``  repo info; a
  dataset's says ``Id`` = OWNER/NAME and ``Type`` 4 ("general": ``MsDataset.load`` then reads it
  with the ``datasets`` library through the same endpoints, ``compat/hub_api.py:
  get_dataset_id_and_type``)
- ``GET /api/v1/repos/internalAccelerationInfo``                               404, as off-cloud
Control (tests and standalone use): ``POST /__shoal__/faults`` (JSON list of ``Fault``
fields), ``DELETE /__shoal__/faults``, ``GET /__shoal__/log``.

Run standalone: ``python -m agent.testing.hub_server --model OWNER/NAME=DIR [--dataset OWNER/NAME=DIR] [--port 0]``;
it prints ``{"url": ...}`` on one line once it is listening.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs

from agent.hubtree import dataset_info, tree_page
from agent.testing.faults import FaultPlan, LoggedRequest
from agent.testing.http import LoopbackServer, ServedApp, fault_control, serve_file, serve_models_main

CONTROL = "/__shoal__/"


def _json(start_response, status: int, payload: object):
    body = json.dumps(payload).encode()
    start_response(f"{status} {'OK' if status < 400 else 'Error'}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _not_found(start_response, what: str):
    return _json(start_response, 404, {"Code": 10010205001, "Message": f"{what} not found",
                                       "Success": False, "RequestId": "local"})


KINDS = {"models": "model", "datasets": "dataset"}  # URL segment -> repo kind


class HubServer(ServedApp):
    """Serves model and dataset directories under ModelScope's API. Thread-safe; see module
    docstring."""

    def __init__(self, *, port: int = 0, keep_alive: bool = False):
        self.faults = FaultPlan()
        self._repos: dict[tuple[str, str], dict[str, Path]] = {}  # (kind, OWNER/NAME) -> revisions
        self._listing_override: dict[tuple[str, str], list[dict]] = {}
        self._sha_cache: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        self._server = LoopbackServer(self, port=port, keep_alive=keep_alive)

    # ------------------------------------------------------------------ setup

    def add_model(self, model_id: str, directory: str | os.PathLike, revision: str = "master") -> None:
        self._add("model", model_id, directory, revision)

    def add_dataset(self, dataset_id: str, directory: str | os.PathLike, revision: str = "master") -> None:
        self._add("dataset", dataset_id, directory, revision)

    def _add(self, kind: str, repo_id: str, directory: str | os.PathLike, revision: str) -> None:
        with self._lock:
            self._repos.setdefault((kind, repo_id), {})[revision] = Path(directory)

    def override_listing(self, model_id: str, files: list[dict], *, kind: str = "model") -> None:
        """Serve ``files`` (raw listing entries) instead of the real listing: lying hubs."""
        with self._lock:
            self._listing_override[(kind, model_id)] = files

    # ---------------------------------------------------------------- helpers

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._sha_cache.get(key)
        if cached:
            return cached
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(4 * 1024 * 1024):
                h.update(block)
        with self._lock:
            self._sha_cache[key] = h.hexdigest()
        return h.hexdigest()

    def _listing(self, key: tuple[str, str], root: Path) -> list[dict]:
        with self._lock:
            override = self._listing_override.get(key)
        if override is not None:
            return override
        entries = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            entries.append({"Name": path.name, "Path": rel, "Type": "blob",
                            "Size": path.stat().st_size, "Sha256": self._sha256(path),
                            "Revision": "local", "CommitId": "local", "IsLFS": True})
        return entries

    def _resolve(self, key: tuple[str, str], revision: str) -> Path | None:
        with self._lock:
            return self._repos.get(key, {}).get(revision)

    # -------------------------------------------------------------------- wsgi

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        method = environ["REQUEST_METHOD"]
        rng = environ.get("HTTP_RANGE")
        if path.startswith(CONTROL):
            return self._control(environ, start_response, path[len(CONTROL):], method)

        target = path + "?" + environ.get("QUERY_STRING", "")
        is_data = path.endswith("/repo") and "FilePath" in query
        fault = self.faults.take(target, data_request=is_data)
        status_holder = {}

        def respond(status_line, headers, exc_info=None):
            status_holder["status"] = int(status_line.split()[0])
            return start_response(status_line, headers, exc_info)

        try:
            if fault and fault.kind == "slow" and not is_data:
                import time
                time.sleep(fault.delay)
            if fault and fault.kind == "status":
                return _json(respond, fault.status, {"Code": fault.status, "Message": fault.code or "fault injected",
                                                     "Success": False})
            return self._route(path, query, environ, respond, fault if is_data else None)
        finally:
            self.faults.record(LoggedRequest(method, target, rng, status_holder.get("status", 0),
                                             fault.kind if fault else None))

    def _route(self, path, query, environ, respond, fault):
        parts = [p for p in path.split("/") if p]
        if parts[:3] == ["api", "v1", "repos"] and parts[3:] == ["internalAccelerationInfo"]:
            return _not_found(respond, "acceleration info")
        if len(parts) < 5 or parts[0] not in ("api", "openapi") or parts[1] != "v1" or parts[2] not in KINDS:
            return _not_found(respond, path)
        kind = KINDS[parts[2]]
        repo_id = f"{parts[3]}/{parts[4]}"
        key = (kind, repo_id)
        rest = parts[5:]
        revision = (query.get("Revision") or ["master"])[0]
        with self._lock:
            known = key in self._repos
        if not known:
            return _not_found(respond, f"{kind} {repo_id}")
        if rest == []:
            info = dataset_info(parts[3], parts[4], "master") if kind == "dataset" else {
                "Id": 1, "Name": parts[4], "Path": parts[3], "ModelId": repo_id, "id": repo_id, "Revision": "master"}
            return _json(respond, 200, {"Code": 200, "Success": True, "Data": info})
        if rest == ["revisions"]:
            with self._lock:
                revs = sorted(self._repos[key])
            return _json(respond, 200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                "Branches": [{"Revision": r} for r in revs], "Tags": []}}})
        root = self._resolve(key, revision)
        if root is None:
            return _not_found(respond, f"revision {revision} of {repo_id}")
        if rest == ["repo", "files"] and kind == "model":
            return _json(respond, 200, {"Code": 200, "Success": True,
                                        "Data": {"Files": self._listing(key, root)}})
        if rest == ["repo", "tree"] and kind == "dataset":
            return _json(respond, 200, {"Code": 200, "Success": True,
                                        "Data": {"Files": tree_page(self._listing(key, root), query)}})
        if rest == ["repo"]:
            rel = (query.get("FilePath") or [""])[0]
            return self._file(root, rel, environ, respond, fault)
        return _not_found(respond, path)

    def _file(self, root: Path, rel: str, environ, respond, fault):
        target = (root / rel).resolve()
        if not rel or root.resolve() not in target.parents or not target.is_file():
            return _not_found(respond, f"file {rel}")
        return serve_file(str(target), target.stat().st_size, environ, respond, fault)

    def _control(self, environ, respond, what, method):
        answer = fault_control(self.faults, environ, respond, what, method, _json)
        return answer if answer is not None else _not_found(respond, what)


def main(argv: list[str] | None = None) -> int:
    return serve_models_main(HubServer, __doc__.splitlines()[0], "master", argv)


if __name__ == "__main__":
    sys.exit(main())
