"""A ModelScope-compatible hub on loopback, serving the endpoints the modelscope SDK calls.

Endpoints (as modelscope 1.40 / modelscope_hub calls them):
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=..&Recursive=True`` listing with SHA-256
- ``GET /api/v1/models/{owner}/{name}/revisions``                               branches and tags
- ``GET /api/v1/models/{owner}/{name}/repo?Revision=..&FilePath=..``          bytes, honouring Range
- ``GET /api/v1/models/{owner}/{name}`` and ``/openapi/v1/models/{owner}/{name}``  model info
- ``GET /api/v1/repos/internalAccelerationInfo``                               404, as off-cloud
Control (tests and standalone use): ``POST /__shoal__/faults`` (JSON list of ``Fault``
fields), ``DELETE /__shoal__/faults``, ``GET /__shoal__/log``.

Run standalone: ``python -m agent.testing.hub_server --model OWNER/NAME=DIR [--port 0]``;
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


class HubServer(ServedApp):
    """Serves model directories under ModelScope's API. Thread-safe; see module docstring."""

    def __init__(self, *, port: int = 0):
        self.faults = FaultPlan()
        self._models: dict[str, dict[str, Path]] = {}
        self._listing_override: dict[str, list[dict]] = {}
        self._sha_cache: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        self._server = LoopbackServer(self, port=port)

    # ------------------------------------------------------------------ setup

    def add_model(self, model_id: str, directory: str | os.PathLike, revision: str = "master") -> None:
        with self._lock:
            self._models.setdefault(model_id, {})[revision] = Path(directory)

    def override_listing(self, model_id: str, files: list[dict]) -> None:
        """Serve ``files`` (raw listing entries) instead of the real listing: lying hubs."""
        with self._lock:
            self._listing_override[model_id] = files

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

    def _listing(self, model_id: str, root: Path) -> list[dict]:
        with self._lock:
            override = self._listing_override.get(model_id)
        if override is not None:
            return override
        entries = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            entries.append({"Name": path.name, "Path": rel, "Type": "blob",
                            "Size": path.stat().st_size, "Sha256": self._sha256(path),
                            "Revision": "local", "CommitId": "local", "IsLFS": True})
        return entries

    def _resolve(self, model_id: str, revision: str) -> Path | None:
        with self._lock:
            return self._models.get(model_id, {}).get(revision)

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
        if len(parts) >= 5 and parts[:3] in (["api", "v1", "models"], ["openapi", "v1", "models"]):
            model_id = f"{parts[3]}/{parts[4]}"
            rest = parts[5:]
            revision = (query.get("Revision") or ["master"])[0]
            with self._lock:
                known = model_id in self._models
            if not known:
                return _not_found(respond, f"model {model_id}")
            if rest == []:
                return _json(respond, 200, {"Code": 200, "Success": True, "Data": {
                    "Id": 1, "Name": parts[4], "Path": parts[3], "ModelId": model_id,
                    "id": model_id, "Revision": "master"}})
            if rest == ["revisions"]:
                with self._lock:
                    revs = sorted(self._models[model_id])
                return _json(respond, 200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                    "Branches": [{"Revision": r} for r in revs], "Tags": []}}})
            root = self._resolve(model_id, revision)
            if root is None:
                return _not_found(respond, f"revision {revision} of {model_id}")
            if rest == ["repo", "files"]:
                return _json(respond, 200, {"Code": 200, "Success": True,
                                            "Data": {"Files": self._listing(model_id, root)}})
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
